"""State dicts of the completion network under every key layout users hold, mapped to
this package's own (GLCIC-PyTorch's module names, see ``architecture.py``).

- GLCIC-PyTorch: ``conv1.weight``, ``bn1.running_mean``, ..., optionally prefixed
  ``module.`` (nn.DataParallel);
- the authors' model converted to PyTorch: nn.Sequential keys ``0.weight``,
  ``1.running_mean``, ... (for layers 1-16: conv, BN, ReLU; then conv17 and Sigmoid);
- mmagic's (formerly mmediting's) Global&Local generator, ``GLEncoderDecoder``, whose 17
  mmcv ``ConvModule``s (conv, then ``bn``, then ReLU; a conv followed by a BN has no bias)
  are ``encoder.enc1`` .. ``enc6``, ``dilation_neck.dilation_convs.0`` .. ``3`` and
  ``decoder.dec1`` .. ``dec7`` (``dec3`` and ``dec5`` transposed, ``dec7`` with a bias and
  no BN): keys ``generator.encoder.enc1.conv.weight``, ``generator.encoder.enc1.bn.running_mean``,
  ... in the inpaintor's checkpoint (beside ``disc.*``, its discriminators, not read here),
  or without ``generator.`` for the generator's own state dict.
"""

from typing import Optional, Tuple

import torch

from glcic_fast.nn.architecture import COMPLETION_LAYERS

#: The layouts ``to_canonical_state_dict`` tells apart by their keys.
GLCIC_PYTORCH = "glcic-pytorch"
AUTHORS_SEQUENTIAL = "authors-sequential"
MMAGIC = "mmagic"

#: mmagic's module of each layer of COMPLETION_LAYERS, in order.
MMAGIC_MODULES = tuple([f"encoder.enc{i}" for i in range(1, 7)]
                       + [f"dilation_neck.dilation_convs.{i}" for i in range(4)]
                       + [f"decoder.dec{i}" for i in range(1, 8)])
_MMAGIC_GENERATOR = "generator."

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class WeightsError(ValueError):
    """A weights file or state dict that cannot be read as a completion network."""


def expected_shapes() -> dict:
    shapes = {}
    for spec in COMPLETION_LAYERS:
        shapes[f"{spec.name}.weight"] = spec.weight_shape
        shapes[f"{spec.name}.bias"] = (spec.out_channels,)
        if spec.has_bn:
            for k in _BN_KEYS:
                shapes[f"bn{spec.index}.{k}"] = (spec.out_channels,)
    return shapes


def _module_names(per_layer) -> dict:
    """A layout's module name -> ours, from (spec, its conv's module, its BN's module)."""
    names = {}
    for spec, conv, bn in per_layer:
        names[conv] = spec.name
        if spec.has_bn:
            names[bn] = f"bn{spec.index}"
    return names


#: The authors' nn.Sequential: for layers 1-16 [conv, BN, ReLU], then conv17 and Sigmoid.
_SEQUENTIAL_NAMES = _module_names((spec, str(3 * i), str(3 * i + 1)) for i, spec in enumerate(COMPLETION_LAYERS))
_MMAGIC_NAMES = _module_names((spec, f"{module}.conv", f"{module}.bn")
                              for spec, module in zip(COMPLETION_LAYERS, MMAGIC_MODULES))


def _renamed(state_dict: dict, names: dict, layout: str) -> dict:
    """``state_dict`` with each key's module (all but its last part) renamed by ``names``."""
    canonical = {}
    for key, value in state_dict.items():
        module, _, attr = key.rpartition(".")
        if module not in names:
            raise WeightsError(f"unexpected key {key!r} for {layout}")
        canonical[f"{names[module]}.{attr}"] = value
    return canonical


def _from_mmagic(state_dict: dict) -> dict:
    """GLCIC-PyTorch's names for mmagic's generator keys (those under ``generator.`` when
    the inpaintor's, all when the generator's own); a conv followed by a BN, which mmcv
    builds without a bias, gets a bias of zeros."""
    if any(k.startswith(_MMAGIC_GENERATOR) for k in state_dict):
        state_dict = {k[len(_MMAGIC_GENERATOR):]: v for k, v in state_dict.items() if k.startswith(_MMAGIC_GENERATOR)}
    canonical = _renamed(state_dict, _MMAGIC_NAMES, "mmagic's Global&Local generator (GLEncoderDecoder)")
    for spec in COMPLETION_LAYERS:
        weight = canonical.get(f"{spec.name}.weight")
        if spec.has_bn and isinstance(weight, torch.Tensor) and f"{spec.name}.bias" not in canonical:
            canonical[f"{spec.name}.bias"] = weight.new_zeros(spec.out_channels)
    return canonical


def to_canonical_state_dict(state_dict) -> Tuple[dict, str]:
    """(state dict under GLCIC-PyTorch's names, the layout it came in:
    ``GLCIC_PYTORCH``, ``AUTHORS_SEQUENTIAL`` or ``MMAGIC``)."""
    if not isinstance(state_dict, dict):
        raise WeightsError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    state_dict = strip_module_prefix(state_dict)
    keys = list(state_dict)
    if "conv1.weight" in state_dict:
        canonical, layout = dict(state_dict), GLCIC_PYTORCH
    elif "0.weight" in state_dict and "1.running_mean" in state_dict:
        canonical = _renamed(state_dict, _SEQUENTIAL_NAMES, "the authors' 50-module nn.Sequential")
        layout = AUTHORS_SEQUENTIAL
    elif "generator.encoder.enc1.conv.weight" in state_dict or "encoder.enc1.conv.weight" in state_dict:
        canonical, layout = _from_mmagic(state_dict), MMAGIC
    else:
        raise WeightsError("not a GLCIC completion network: expected GLCIC-PyTorch keys (conv1.weight, "
                           "bn1.running_mean, ...), the authors' nn.Sequential keys (0.weight, "
                           "1.running_mean, ...) or mmagic's Global&Local keys (generator.encoder.enc1.conv.weight, "
                           f"...); found keys like {keys[:4]}")
    _check_shapes(canonical)
    return canonical, layout


def _check_shapes(state_dict):
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{key} is a {type(value).__name__}, not a tensor")
    shapes = expected_shapes()
    missing = [k for k in shapes if k not in state_dict]
    if missing:
        raise WeightsError(f"incomplete completion-network weights: {len(missing)} tensors missing, "
                           f"for example {missing[:3]} (a truncated or partial checkpoint?)")
    for key, shape in shapes.items():
        got = tuple(state_dict[key].shape)
        if got != shape:
            raise WeightsError(f"{key} has shape {got}, expected {shape}")


def strip_module_prefix(state_dict: dict) -> dict:
    """``state_dict`` without nn.DataParallel's ``module.`` prefix (when every key has it)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def proven_block_order(canonical: dict, layout: str) -> Tuple[Optional[bool], str]:
    """(the block order a state dict proves, as ``bn_after_relu``, or None where it cannot
    tell; the reason). Key names do not tell GLCIC-PyTorch's weights from the authors'
    renamed to GLCIC-PyTorch's names, but two things do prove conv -> BN -> ReLU:

    - the authors' nn.Sequential layout, whose module order puts each BN right after its
      conv;
    - mmagic's layout: its ConvModules run conv -> norm -> act (mmcv's default order, which
      the Global&Local modules keep);
    - a negative BN running mean: after a ReLU (conv -> ReLU -> BN) a BN only ever sees
      values >= 0, so the running mean it learns, from its initial 0, stays >= 0.
    """
    if layout == AUTHORS_SEQUENTIAL:
        return False, "the authors' nn.Sequential keys (0.weight, 1.running_mean, ...) put each BN right after its conv"
    if layout == MMAGIC:
        return False, "mmagic's Global&Local ConvModules run conv -> BN -> ReLU"
    for spec in COMPLETION_LAYERS:
        if spec.has_bn:
            key = f"bn{spec.index}.running_mean"
            if (canonical[key] < 0).any():
                return False, (f"{key} has negative values, which only a BN before the ReLU learns "
                               "(after a ReLU a BN sees values >= 0)")
    return None, "the keys and statistics fit either block order"


def unwrap_checkpoint(obj, wrappers):
    """The state dict inside a training script's checkpoint: ``obj[w]`` for each key ``w`` of
    ``wrappers`` in turn that holds a dict (e.g. {"state_dict": {...}, "optimizer": ...})."""
    for wrapper in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    return obj


def with_bn_counters(module, state: dict) -> dict:
    """``state`` with the BatchNorm ``num_batches_tracked`` counters ``module`` has and
    ``state`` lacks: training bookkeeping that some layouts do not carry."""
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    return state
