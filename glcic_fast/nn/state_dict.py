"""State dicts of the completion network under every key layout users hold, mapped to
this package's own (GLCIC-PyTorch's module names, see ``architecture.py``).

- GLCIC-PyTorch: ``conv1.weight``, ``bn1.running_mean``, ..., optionally prefixed
  ``module.`` (nn.DataParallel);
- the authors' model converted to PyTorch: nn.Sequential keys ``0.weight``,
  ``1.running_mean``, ... (for layers 1-16: conv, BN, ReLU; then conv17 and Sigmoid).
"""

from typing import Optional, Tuple

from glcic_fast.nn.architecture import COMPLETION_LAYERS

#: The layouts ``to_canonical_state_dict`` tells apart by their keys.
GLCIC_PYTORCH = "glcic-pytorch"
AUTHORS_SEQUENTIAL = "authors-sequential"

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


def _sequential_index_map() -> dict:
    """Authors' nn.Sequential: for layers 1-16 [conv, BN, ReLU], then conv17 and Sigmoid."""
    names = {}
    for i, spec in enumerate(COMPLETION_LAYERS):
        names[str(3 * i)] = spec.name
        if spec.has_bn:
            names[str(3 * i + 1)] = f"bn{spec.index}"
    return names


def to_canonical_state_dict(state_dict) -> Tuple[dict, str]:
    """(state dict under GLCIC-PyTorch's names, the layout it came in:
    ``GLCIC_PYTORCH`` or ``AUTHORS_SEQUENTIAL``)."""
    if not isinstance(state_dict, dict):
        raise WeightsError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    state_dict = strip_module_prefix(state_dict)
    keys = list(state_dict)
    if "conv1.weight" in state_dict:
        canonical, layout = dict(state_dict), GLCIC_PYTORCH
    elif "0.weight" in state_dict and "1.running_mean" in state_dict:
        index_map = _sequential_index_map()
        canonical = {}
        for key, value in state_dict.items():
            module, _, attr = key.partition(".")
            if module not in index_map:
                raise WeightsError(f"unexpected key {key!r} for the authors' 50-module nn.Sequential")
            canonical[f"{index_map[module]}.{attr}"] = value
        layout = AUTHORS_SEQUENTIAL
    else:
        raise WeightsError("not a GLCIC completion network: expected GLCIC-PyTorch keys (conv1.weight, "
                           "bn1.running_mean, ...) or the authors' nn.Sequential keys (0.weight, "
                           f"1.running_mean, ...); found keys like {keys[:4]}")
    _check_shapes(canonical)
    return canonical, layout


def _check_shapes(state_dict):
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
    - a negative BN running mean: after a ReLU (conv -> ReLU -> BN) a BN only ever sees
      values >= 0, so the running mean it learns, from its initial 0, stays >= 0.
    """
    if layout == AUTHORS_SEQUENTIAL:
        return False, "the authors' nn.Sequential keys (0.weight, 1.running_mean, ...) put each BN right after its conv"
    for spec in COMPLETION_LAYERS:
        if spec.has_bn:
            key = f"bn{spec.index}.running_mean"
            if (canonical[key] < 0).any():
                return False, (f"{key} has negative values, which only a BN before the ReLU learns "
                               "(after a ReLU a BN sees values >= 0)")
    return None, "the keys and statistics fit either block order"
