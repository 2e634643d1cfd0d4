"""Reading and writing completion-network weights in every layout users hold.

- ours: safetensors, tensors under GLCIC-PyTorch's names, plus metadata (block order,
  input convention, mean pixel);
- GLCIC-PyTorch checkpoints (``conv1.weight``, ``bn1.running_mean``, ..., optionally
  prefixed ``module.``), with the run's ``config.json`` for the mean pixel ``mpv``;
- the authors' model converted to PyTorch (nn.Sequential keys ``0.weight``,
  ``1.running_mean``, ...), a .pth;
- the authors' Torch7 ``.t7`` release, read with torchfile (``completionnet_places2.t7``,
  ``completionnet_places2_freeform.t7``, ``completionnet_celeba.t7``: one structure, told
  apart only by their file names);
- mmagic's (mmediting's) Global&Local checkpoints (``gl_256x256_8x12_places_*.pth``,
  ``..._celeba_*.pth``): ``{"meta": ..., "state_dict": {"generator.*", "disc.*"}}``, with
  an ``optimizer`` (and mmengine's ``message_hub``) in training checkpoints.

Pickled files are read with ``torch.load(weights_only=True)``: a user's file never runs code.
What a training checkpoint keeps beside the weights (mmengine's log buffers, numpy values)
is read as inert placeholders; anything else the weights-only reader refuses is reported.
A hostile file is refused with a WeightsError before it costs much: zip checkpoints with
compressed records, more placeholder globals than a real checkpoint needs, .t7 tensors
whose header reaches outside their storage.
"""

import contextlib
import json
import os
import pickle
import re
import threading
import zipfile
from typing import Optional

import numpy as np
import torch

from glcic_fast.files import atomic_write
from glcic_fast.nn.architecture import COMPLETION_LAYERS
from glcic_fast.nn.completion_net import (MEAN_FILLED_HOLE, MEAN_SUBTRACTED_ZERO_HOLE, PLACES2_MEAN_PIXEL,
                                          SIGNED_BGR_ZERO_HOLE, CompletionNet, layout_output_activation)
from glcic_fast.nn.state_dict import (GLCIC_PYTORCH, MMAGIC, WeightsError, proven_block_order, to_canonical_state_dict,
                                      unwrap_checkpoint, with_bn_counters)

FORMAT_NAME = "glcic_fast"
FORMAT_VERSION = "1"

#: The authors' released models (their README, download_model.sh), by file name: one
#: structure (the 50-module nn.Sequential and the mean pixel), run alike by their
#: inpaint.lua, so only the name tells them apart.
AUTHORS_MODELS = (
    ("completionnet_places2_freeform", "places2, trained with free-form holes; the authors' default model, "
                                       "meant to work without post-processing"),
    ("completionnet_places2", "places2, trained with rectangular holes"),
    ("completionnet_celeba", "CelebA faces, trained with rectangular holes"),
)


def authors_model(path) -> Optional[str]:
    """Which of the authors' released models the file at ``path`` is, by its name, or None."""
    name = os.path.basename(os.fspath(path)).lower()
    return next((what for stem, what in AUTHORS_MODELS if name.startswith(stem)), None)


def _authors_source(kind: str, path) -> str:
    if path is None:
        return kind
    model = authors_model(path)
    return f"{kind}, {model} ({path})" if model else f"{kind} ({path})"


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


#: Modules whose objects training checkpoints keep beside the weights: numpy (scalars and
#: arrays in metadata and logs), mmengine / mmcv / mmagic / mmedit (log buffers such as
#: mmengine's HistoryBuffer in ``message_hub``). Their globals are read as ``_Unread``.
_BOOKKEEPING_MODULES = ("numpy", "mmengine", "mmcv", "mmagic", "mmedit")


class _Unread:
    """Stands in for an object of the bookkeeping modules when a checkpoint is read: built
    from whatever the file gives, it keeps and runs nothing (the real class is never
    imported), so such a file is read without running any of its code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _is_bookkeeping(name: str) -> bool:
    return name.split(".", 1)[0] in _BOOKKEEPING_MODULES


#: Loads here change reader state that is process-wide: ``torch.serialization.safe_globals``
#: swaps torch's allowlist of globals for the whole process (not per thread) while a load
#: runs, and the .t7 reader swaps entries of torchfile's module-level ``type_handlers``. A
#: threaded server may load weights in several threads at once: one load at a time, so no
#: load runs under (or restores over) another's allowlist or handlers.
_PROCESS_WIDE_READER_STATE = threading.Lock()

#: Real mmagic/mmengine checkpoints keep a handful of bookkeeping globals (numpy's
#: reconstructors and dtypes, mmengine's HistoryBuffer). The legacy format names them one
#: torch.load at a time, and each name makes every later global lookup dearer: a file
#: naming hundreds of them would cost minutes of CPU, so it is refused beyond this cap.
#: Each retry adds at least one name (or raises), so this caps the re-reads too.
_MAX_PLACEHOLDERS = 32


def _refuse_compressed_zip(path):
    """torch writes the records of its zip checkpoints stored, never compressed: refuse a
    zip whose records are compressed, or say they expand beyond the file's size, before
    torch inflates them (a 1 MB file could otherwise expand to gigabytes)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsError(f"could not read {path} as a PyTorch checkpoint (a damaged zip file): {exc}") from exc
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise WeightsError(f"could not read {path} as a PyTorch checkpoint: its records {compressed[:3]} are "
                           "compressed; torch.save stores them uncompressed (was the file repacked by a zip tool?)")
    expanded, size = sum(e.file_size for e in entries), os.path.getsize(path)
    if expanded > size:
        raise WeightsError(f"could not read {path} as a PyTorch checkpoint: its zip records claim {expanded} bytes "
                           f"in a file of {size} bytes; torch.save stores them uncompressed")


def _refused_globals(path, error) -> set:
    """The globals the weights-only reader refuses in the checkpoint at ``path``: all of
    them at once for a zip checkpoint (read statically, nothing unpickled), else the one
    its ``error`` names (the legacy format is read one refusal at a time)."""
    if zipfile.is_zipfile(path) and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    match = re.search(r"GLOBAL (\S+)", str(error))
    return {match.group(1)} if match else set()


def _placeholders_for(names):
    if not names:
        return contextlib.nullcontext()
    if not hasattr(torch.serialization, "safe_globals"):
        raise WeightsError(f"this checkpoint keeps objects of {', '.join(sorted(names))} beside its weights; "
                           f"reading them as inert placeholders needs torch >= 2.5 (this is {torch.__version__})")
    return torch.serialization.safe_globals([(_Unread, name) for name in sorted(names)])


def _load_weights_only(path):
    """``torch.load(path, weights_only=True)``, with the bookkeeping modules' globals read
    as ``_Unread`` placeholders; WeightsError naming anything else the file refers to."""
    _refuse_compressed_zip(path)
    with _PROCESS_WIDE_READER_STATE:
        return _load_with_placeholders(path)


def _unreadable(path, exc):
    return WeightsError(f"could not read {path} as a PyTorch checkpoint (weights only, no code is run): "
                        f"{type(exc).__name__}: {exc}")


def _load_with_placeholders(path):
    placeholders = set()
    while True:  # ends: each turn returns, raises, or adds a name, and names are capped
        context = _placeholders_for(placeholders)
        try:
            with context:
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            try:
                refused = _refused_globals(path, exc) - placeholders
            except Exception as scan_error:  # torch's static scan refuses opcodes (INST, LIST, protocol 4/5)
                raise _unreadable(path, scan_error) from scan_error
            unsafe = sorted(name for name in refused if not _is_bookkeeping(name))
            if unsafe:
                raise WeightsError(
                    f"could not read {path} safely: it refers to {', '.join(unsafe)}, which a weights file has no "
                    "need of; glcic_fast reads weights only (tensors, plain Python values, and numpy / mmengine / "
                    "mmcv / mmagic bookkeeping as inert placeholders) and never imports or runs what a file names. "
                    "Nothing was run. If the file is yours, save its state dict alone (torch.save(checkpoint"
                    "['state_dict'], ...)) where you trust it.") from None
            if not refused:
                raise _unreadable(path, exc) from exc
            placeholders |= refused
            if len(placeholders) > _MAX_PLACEHOLDERS:
                raise _too_many_placeholders(path, placeholders) from None
        except Exception as exc:  # torch raises many types for truncated or foreign files
            raise _unreadable(path, exc) from exc


def _too_many_placeholders(path, placeholders):
    return WeightsError(f"could not read {path} as a PyTorch checkpoint: it names {len(placeholders)} or more "
                        f"numpy / mmengine / mmcv / mmagic globals beside its weights (such as "
                        f"{', '.join(sorted(placeholders)[:3])}); a real checkpoint needs a handful, at most "
                        f"{_MAX_PLACEHOLDERS} are read as placeholders")


def _read_pickled_state_dict(path):
    obj = _load_weights_only(path)
    return unwrap_checkpoint(obj, ("state_dict", "model", "model_cn"))  # common training-script wrappers


#: Torch7's tensor and storage classes, by the numpy type of their values.
_TORCH7_TYPES = {"Byte": np.uint8, "Char": np.int8, "Short": np.int16, "Int": np.int32, "Long": np.int64,
                 "Float": np.float32, "Double": np.float64}


def _torch7_class_names():
    """(tensor class, storage class, numpy type) for every CPU and CUDA type torchfile reads."""
    for kind, dtype in _TORCH7_TYPES.items():
        yield f"torch.{kind}Tensor".encode(), f"torch.{kind}Storage".encode(), dtype
        cuda = "Cuda" if kind == "Float" else f"Cuda{kind}"  # Torch7 names CUDA floats torch.CudaTensor
        if kind != "Long":
            yield f"torch.{cuda}Tensor".encode(), f"torch.{cuda}Storage".encode(), dtype


def _strict_storage_reader(dtype):
    def read(reader, version):
        start = reader.f.tell()
        size = reader.read_long()
        data = np.fromfile(reader.f, dtype=dtype, count=size)
        if data.size != size:
            raise WeightsError(f"truncated .t7 file: a storage of {size} values at byte {start} has {data.size}")
        return data
    return read


def _strict_tensor_reader(dtype):
    """torchfile's tensor reader (Torch7's Tensor.c read order), checking that the view the
    header describes lies inside its storage before building it."""
    def read(reader, version):
        start = reader.f.tell()
        ndim = reader.read_int()
        if ndim < 0:
            raise WeightsError(f"malformed .t7 file: a tensor at byte {start} has {ndim} dimensions")
        size = reader.read_long_array(ndim)
        stride = reader.read_long_array(ndim)
        offset = reader.read_long() - 1  # the file counts from 1
        storage = reader.read_obj()
        if storage is None or ndim == 0:
            return np.empty((0,), dtype=dtype)  # Torch7's empty tensor
        if not isinstance(storage, np.ndarray) or storage.dtype != dtype:
            raise WeightsError(f"malformed .t7 file: the tensor at byte {start} of {np.dtype(dtype)} values has "
                               f"no storage of that type")
        if offset < 0 or min(size) < 0 or min(stride) < 0:
            raise WeightsError(f"malformed .t7 file: the tensor at byte {start} has sizes {size}, strides {stride} "
                               f"and storage offset {offset + 1}; expected none negative (the offset from 1)")
        last = offset + sum((n - 1) * step for n, step in zip(size, stride))
        if min(size) > 0 and last >= storage.size:
            raise WeightsError(f"malformed .t7 file: the tensor at byte {start} (sizes {size}, strides {stride}, "
                               f"offset {offset + 1}) reaches value {last + 1} of a storage of {storage.size}")
        return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                               strides=[storage.itemsize * step for step in stride])
    return read


@contextlib.contextmanager
def _strict_torchfile_readers(torchfile):
    """torchfile returns a short array for a truncated storage, and builds each tensor as a
    strided view of its storage without checking the header's sizes, strides and offset
    (a view past the storage reads the heap, or crashes the process). Swap in readers
    that check both, for the time of one load (under _PROCESS_WIDE_READER_STATE)."""
    saved = dict(torchfile.type_handlers)
    for tensor_class, storage_class, dtype in _torch7_class_names():
        torchfile.type_handlers[tensor_class] = _strict_tensor_reader(dtype)
        torchfile.type_handlers[storage_class] = _strict_storage_reader(dtype)
    try:
        yield
    finally:
        torchfile.type_handlers.clear()
        torchfile.type_handlers.update(saved)


def _read_t7(path):
    """The authors' Torch7 file: a table {model = nn.Sequential (50 modules), mean = RGB}."""
    import torchfile

    try:
        with _PROCESS_WIDE_READER_STATE, _strict_torchfile_readers(torchfile):
            table = torchfile.load(path, utf8_decode_strings=True)
    except WeightsError:
        raise
    except Exception as exc:  # torchfile raises many types on malformed input (RecursionError for deep tables)
        raise WeightsError(f"could not read {path} as a Torch7 file (truncated or not .t7?): "
                           f"{type(exc).__name__}: {exc}") from exc
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
            checkpoint: GLCIC-PyTorch, the authors' layout converted, or mmagic's
            Global&Local) or a state dict.
        config: for GLCIC-PyTorch checkpoints, the run's config.json (a path or a dict)
            holding ``mpv``; by default config.json beside the checkpoint. For the
            authors' converted .pth, ``{"mean_pixel": [r, g, b]}`` overrides the places2
            mean it otherwise assumes. mmagic's checkpoints need none (their
            normalisation is fixed: SIGNED_BGR_ZERO_HOLE).
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
        try:
            net = CompletionNet(metadata["bn_after_relu"] == "true", input_convention=metadata["input_convention"],
                                output_activation=metadata.get("output_activation"),  # absent: the sigmoid
                                mean_pixel=json.loads(metadata["mean_pixel"]), backend=backend)
        except (KeyError, ValueError) as exc:
            raise WeightsError(f"{path}: glcic_fast metadata missing or invalid ({type(exc).__name__}: {exc}); "
                               f"metadata {metadata}") from None
        _load_canonical(net, to_canonical_state_dict(tensors)[0])
        saved_from = metadata.get("weights_source")
        net.weights_source = f"glcic_fast ({path})" + (f", saved from {saved_from}" if saved_from else "")
        return net

    if path is not None and path.endswith(".t7"):
        state, mean = _read_t7(path)
        configured = _mean_from_config(cfg)
        mean = mean if configured is None else configured
        if mean is None:
            raise WeightsError(f"{path} holds no mean pixel; pass config={{'mean_pixel': [r, g, b]}}")
        net = CompletionNet(False, input_convention=MEAN_SUBTRACTED_ZERO_HOLE, mean_pixel=mean, backend=backend)
        _load_canonical(net, state)
        net.weights_source = _authors_source("authors' Torch7", path)
        return net

    state_dict = _read_pickled_state_dict(path) if path is not None else source
    canonical, layout = to_canonical_state_dict(state_dict)
    mean = _mean_from_config(cfg)
    authors_order, reason = proven_block_order(canonical, layout)
    if layout == MMAGIC:
        net = CompletionNet(False, output_activation=layout_output_activation(MMAGIC),
                            input_convention=SIGNED_BGR_ZERO_HOLE, backend=backend)
        net.block_order_reason = f"from the weights: {reason}"
        net.weights_source = "mmagic Global&Local" + (f" ({path})" if path else "")
    elif layout == GLCIC_PYTORCH and authors_order is None:
        if mean is None:
            raise WeightsError("a GLCIC-PyTorch checkpoint needs its run's mean pixel: put the run's config.json "
                               "beside it or pass config='path/to/config.json' (or config={'mpv': [r, g, b]})")
        net = CompletionNet(True, input_convention=MEAN_FILLED_HOLE, mean_pixel=mean, backend=backend)
        net.weights_source = "GLCIC-PyTorch" + (f" ({path})" if path else "")
    else:  # the authors' layout, or their block order under GLCIC-PyTorch's names
        net = CompletionNet(False, input_convention=MEAN_SUBTRACTED_ZERO_HOLE,
                            mean_pixel=PLACES2_MEAN_PIXEL if mean is None else mean, backend=backend)
        net.block_order_reason = f"from the weights: {reason}"
        kind = ("authors' layout, converted" if layout != GLCIC_PYTORCH
                else "GLCIC-PyTorch's keys, the authors' block order (from the BN statistics)")
        net.weights_source = _authors_source(kind, path)
    _load_canonical(net, canonical)
    return net


def _load_canonical(net: CompletionNet, state: dict):
    net.load_state_dict(with_bn_counters(net, state), strict=True)  # refuses weights that prove the other block order


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
                "output_activation": net.output_activation,
                "mean_pixel": json.dumps(net.mean_pixel.tolist()),
                "weights_source": net.weights_source}
    data = to_bytes(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))
