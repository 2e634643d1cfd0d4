from glcic_fast.kernels import conv2d_bias_act  # noqa: F401  (registers the "triton" backend of the conv ops)
from glcic_fast.kernels import masked_mse  # noqa: F401  (registers the "triton" backend of masked_mse)
