"""glcic_fast: fast, exact GLCIC image completion (Iizuka et al., SIGGRAPH 2017)."""

import sys

from glcic_fast.devices import use_huge_pages_for_cpu_tensors

# Before the imports below could allocate a large tensor: PyTorch reads the switch once.
use_huge_pages_for_cpu_tensors()

from glcic_fast import ops
from glcic_fast.nn import reference
from glcic_fast.nn.architecture import COMPLETION_LAYERS
from glcic_fast.inference.api import complete
from glcic_fast.inference.export import export_onnx
from glcic_fast.nn.completion_net import (MEAN_FILLED_HOLE, MEAN_SUBTRACTED_ZERO_HOLE, SIGNED_BGR_ZERO_HOLE,
                                         CompletionNet)
from glcic_fast.nn.weights import WeightsError, load, save

#: GLCIC-PyTorch's class name for the same network, so that a drop-in swap changes only the
#: import line (``CompletionNetwork()`` takes no arguments there either).
CompletionNetwork = CompletionNet

# The reference oracle was the module glcic_fast.reference before the package was arranged
# by role: `import glcic_fast.reference` keeps working.
sys.modules[__name__ + ".reference"] = reference

__version__ = "0.1.0"

__all__ = ["CompletionNet", "CompletionNetwork", "load", "save", "complete", "export_onnx", "ops", "reference",
           "COMPLETION_LAYERS", "MEAN_FILLED_HOLE", "MEAN_SUBTRACTED_ZERO_HOLE", "SIGNED_BGR_ZERO_HOLE", "WeightsError"]
