"""Triton kernels and their launchers, installed as glcic_fast.kernels: one module per fused
op, named after it (conv2d_bias_act, masked_mse). The ops, their dispatcher backends and
their torch custom ops live in glcic_fast/ops/, which imports these modules when Triton
loads; nothing here imports glcic_fast.ops.
"""

import os

#: Triton runs its kernels in its CPU interpreter (numpy), on CPU tensors. Triton reads the
#: variable once, when it is imported: so does this package.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
