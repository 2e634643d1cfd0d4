"""Reading and writing completion-network weights in every layout users hold.

- ours: safetensors, tensors under GLCIC-PyTorch's names, plus metadata (block order,
  input convention, mean pixel);
- GLCIC-PyTorch checkpoints (``conv1.weight``, ``bn1.running_mean``, ..., optionally
  prefixed ``module.``), with the run's ``config.json`` for the mean pixel ``mpv``;
- the authors' model converted to PyTorch (nn.Sequential keys ``0.weight``,
  ``1.running_mean``, ...), a .pth;
- the authors' Torch7 ``.t7`` release, read with torchfile.

Pickled files are read with ``torch.load(weights_only=True)``: a user's file never runs code.
"""

import contextlib
import json
import os
from typing import Optional

import numpy as np
import torch

from glcic_fast.files import atomic_write
from glcic_fast.nn.architecture import COMPLETION_LAYERS
from glcic_fast.nn.completion_net import MEAN_FILLED_HOLE, MEAN_SUBTRACTED_ZERO_HOLE, PLACES2_MEAN_PIXEL, CompletionNet
from glcic_fast.nn.state_dict import GLCIC_PYTORCH, WeightsError, proven_block_order, to_canonical_state_dict

FORMAT_NAME = "glcic_fast"
FORMAT_VERSION = "1"

def _read_config(config, path) -> dict:
    """The run's config: a dict, a path to config.json, or config.json beside the weights."""
    if isinstance(config, dict):
        return config
    candidate = config
    if candidate is None and path is not None:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        candidate = beside if os.path.exists(beside) else None
    if candidate is None:
        return {}
    try:
        with open(candidate) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"could not read the config {candidate}: {exc}") from exc


def _mean_from_config(config: dict):
    for key in ("mean_pixel", "mpv", "mean"):
        if key in config:
            return config[key]
    return None


# -- readers ------------------------------------------------------------------------------

def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"could not read {path} as safetensors (truncated or corrupt?): {exc}") from exc
    return tensors, metadata


def _read_pickled_state_dict(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        raise WeightsError(f"could not read {path} as a PyTorch checkpoint (weights only, no code is run): "
                           f"{type(exc).__name__}: {exc}") from exc
    for wrapper in ("state_dict", "model", "model_cn"):  # common training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    return obj


@contextlib.contextmanager
def _strict_torchfile_storages(torchfile):
    """torchfile returns a short array for a truncated storage (and then views memory
    past it). Wrap its storage readers so that a short read is an error."""
    saved = dict(torchfile.type_handlers)

    def strict(dtype):
        def read(reader, version):
            start = reader.f.tell()
            size = reader.read_long()
            data = np.fromfile(reader.f, dtype=dtype, count=size)
            if data.size != size:
                raise WeightsError(f"truncated .t7 file: a storage of {size} values at byte {start} has {data.size}")
            return data
        return read

    for name, dtype in ((b"torch.FloatStorage", np.float32), (b"torch.DoubleStorage", np.float64),
                        (b"torch.CudaStorage", np.float32), (b"torch.LongStorage", np.int64)):
        torchfile.type_handlers[name] = strict(dtype)
    try:
        yield
    finally:
        torchfile.type_handlers.clear()
        torchfile.type_handlers.update(saved)


def _read_t7(path):
    """The authors' Torch7 file: a table {model = nn.Sequential (50 modules), mean = RGB}."""
    import struct

    import torchfile

    try:
        with _strict_torchfile_storages(torchfile):
            table = torchfile.load(path, utf8_decode_strings=True)
    except WeightsError:
        raise
    except (struct.error, EOFError, ValueError, UnicodeDecodeError, torchfile.T7ReaderException) as exc:
        raise WeightsError(f"could not read {path} as a Torch7 file (truncated or not .t7?): {exc}") from exc
    model = table.get("model") if isinstance(table, dict) else table
    modules = getattr(model, "modules", None)
    if not isinstance(modules, list):
        raise WeightsError(f"{path}: expected an nn.Sequential under 'model', got {type(model).__name__}")
    convs = [m for m in modules if m.torch_typename().decode() in
             ("nn.SpatialConvolution", "nn.SpatialDilatedConvolution", "nn.SpatialFullConvolution")]
    bns = [m for m in modules if m.torch_typename().decode() == "nn.SpatialBatchNormalization"]
    if len(convs) != len(COMPLETION_LAYERS) or len(bns) != len(COMPLETION_LAYERS) - 1:
        raise WeightsError(f"{path}: expected {len(COMPLETION_LAYERS)} convolutions and "
                           f"{len(COMPLETION_LAYERS) - 1} batch norms, found {len(convs)} and {len(bns)}")
    state = {}
    for spec, conv in zip(COMPLETION_LAYERS, convs):
        # Old Torch7 saves may keep conv weights flattened to 2-d: restore the 4-d shape.
        state[f"{spec.name}.weight"] = torch.from_numpy(np.array(conv.weight, dtype=np.float32)).reshape(spec.weight_shape)
        state[f"{spec.name}.bias"] = torch.from_numpy(np.array(conv.bias, dtype=np.float32))
    for spec, bn in zip(COMPLETION_LAYERS, bns):
        n, eps = spec.out_channels, float(bn.eps if bn.eps is not None else 1e-5)
        arr = lambda a, fill: torch.full((n,), fill) if a is None else torch.from_numpy(np.array(a, dtype=np.float32))
        if bn.running_var is not None:
            var = arr(bn.running_var, 1.0)
        elif bn.running_std is not None:  # older nn: running_std holds 1 / sqrt(var + eps)
            var = 1.0 / arr(bn.running_std, 1.0) ** 2 - eps
        else:
            raise WeightsError(f"{path}: batch norm {spec.index} has no running statistics")
        state[f"bn{spec.index}.weight"] = arr(bn.weight, 1.0)
        state[f"bn{spec.index}.bias"] = arr(bn.bias, 0.0)
        state[f"bn{spec.index}.running_mean"] = arr(bn.running_mean, 0.0)
        state[f"bn{spec.index}.running_var"] = var
        if abs(eps - 1e-5) > 1e-12:
            raise WeightsError(f"{path}: batch norm {spec.index} uses eps={eps}, expected 1e-5")
    mean = table.get("mean") if isinstance(table, dict) else None
    return state, (None if mean is None else np.array(mean, dtype=np.float64).tolist())


# -- public API ---------------------------------------------------------------------------

def load(source, config=None, *, backend: Optional[str] = None) -> CompletionNet:
    """A CompletionNet from any weights users hold.

    Args:
        source: a path (.safetensors ours, .t7 the authors', anything else a PyTorch
            checkpoint: GLCIC-PyTorch or the authors' layout converted) or a state dict.
        config: for GLCIC-PyTorch checkpoints, the run's config.json (a path or a dict)
            holding ``mpv``; by default config.json beside the checkpoint. For the
            authors' converted .pth, ``{"mean_pixel": [r, g, b]}`` overrides the places2
            mean it otherwise assumes.
    """
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise WeightsError(f"no weights file at {path}")
    cfg = _read_config(config, path)

    if path is not None and path.endswith(".safetensors"):
        tensors, metadata = _read_safetensors(path)
        if metadata.get("format") != FORMAT_NAME:
            raise WeightsError(f"{path} is a safetensors file but not glcic_fast weights (metadata {metadata})")
        net = CompletionNet(metadata["bn_after_relu"] == "true", input_convention=metadata["input_convention"],
                            mean_pixel=json.loads(metadata["mean_pixel"]), backend=backend)
        _load_canonical(net, to_canonical_state_dict(tensors)[0])
        net.weights_source = f"glcic_fast ({path})"
        return net

    if path is not None and path.endswith(".t7"):
        state, mean = _read_t7(path)
        configured = _mean_from_config(cfg)
        mean = mean if configured is None else configured
        if mean is None:
            raise WeightsError(f"{path} holds no mean pixel; pass config={{'mean_pixel': [r, g, b]}}")
        net = CompletionNet(False, input_convention=MEAN_SUBTRACTED_ZERO_HOLE, mean_pixel=mean, backend=backend)
        _load_canonical(net, state)
        net.weights_source = f"authors' Torch7 ({path})"
        return net

    state_dict = _read_pickled_state_dict(path) if path is not None else source
    canonical, layout = to_canonical_state_dict(state_dict)
    mean = _mean_from_config(cfg)
    authors_order, reason = proven_block_order(canonical, layout)
    if layout == GLCIC_PYTORCH and authors_order is None:
        if mean is None:
            raise WeightsError("a GLCIC-PyTorch checkpoint needs its run's mean pixel: put the run's config.json "
                               "beside it or pass config='path/to/config.json' (or config={'mpv': [r, g, b]})")
        net = CompletionNet(True, input_convention=MEAN_FILLED_HOLE, mean_pixel=mean, backend=backend)
        net.weights_source = "GLCIC-PyTorch" + (f" ({path})" if path else "")
    else:  # the authors' layout, or their block order under GLCIC-PyTorch's names
        net = CompletionNet(False, input_convention=MEAN_SUBTRACTED_ZERO_HOLE,
                            mean_pixel=PLACES2_MEAN_PIXEL if mean is None else mean, backend=backend)
        net.block_order_reason = f"from the weights: {reason}"
        net.weights_source = "authors' layout, converted" + (f" ({path})" if path else "")
    _load_canonical(net, canonical)
    return net


def _load_canonical(net: CompletionNet, state: dict):
    # num_batches_tracked is training bookkeeping that some layouts do not carry.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    net.load_state_dict(state, strict=True)  # refuses weights that prove the other block order


def save(net: CompletionNet, path) -> None:
    """Write ``net`` in glcic_fast's format (safetensors + metadata), atomically: the file
    at ``path`` is replaced only once the new one is complete."""
    from safetensors.torch import save as to_bytes

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"glcic_fast weights are safetensors files: name it *.safetensors, got {path}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "bn_after_relu": "true" if net.bn_after_relu else "false",
                "input_convention": net.input_convention,
                "mean_pixel": json.dumps(net.mean_pixel.tolist())}
    data = to_bytes(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))
