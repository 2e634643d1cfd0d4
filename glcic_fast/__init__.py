"""glcic_fast: fast, exact GLCIC image completion (Iizuka et al., SIGGRAPH 2017)."""

from . import ops, reference
from .architecture import COMPLETION_LAYERS
from .api import complete
from .model import MEAN_FILLED_HOLE, MEAN_SUBTRACTED_ZERO_HOLE, CompletionNet
from .weights import WeightsError, load, save

__version__ = "0.1.0"

__all__ = ["CompletionNet", "load", "save", "complete", "ops", "reference", "COMPLETION_LAYERS",
           "MEAN_FILLED_HOLE", "MEAN_SUBTRACTED_ZERO_HOLE", "WeightsError"]
