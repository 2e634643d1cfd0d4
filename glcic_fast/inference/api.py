"""``glcic_fast.complete``: one call from an image and a mask to the completed image.

The net-taking function is :func:`glcic_fast.inference.completion.complete_with` (also
``CompletionNet.complete``); this one finds the weights, the device and the dtype.
"""

import os
import warnings
from collections import OrderedDict

import numpy as np
import torch

from glcic_fast.devices import default_device, parse_dtype

#: Environment variable naming the weights ``glcic_fast.complete`` and the command line
#: use when none are given.
WEIGHTS_ENV = "GLCIC_FAST_WEIGHTS"
#: ``weights=RANDOM`` asks for a randomly initialised net (for timings and smoke tests).
RANDOM = "random"

_NET_CACHE: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_NET_CACHE_SIZE = 4


class NoWeightsError(ValueError):
    """No weights were given and none are configured."""


def random_net():
    from glcic_fast.nn.completion_net import CompletionNet

    warnings.warn("glcic_fast: the completion network is randomly initialised: its output is noise, "
                  "not a completion (pass trained weights to get real results)", RuntimeWarning, stacklevel=3)
    return CompletionNet(bn_after_relu=False)  # the authors' order, BN folded: what timings quote


def get_net(weights=None, device=None, dtype=None, config=None):
    """A CompletionNet in eval mode on ``device`` in ``dtype``.

    ``weights``: a CompletionNet (used as is when already on that device and dtype, else
    a converted copy), anything :func:`glcic_fast.load` reads (a path, a state dict),
    ``"random"`` (random initialisation, with a warning), or None: the path in the
    ``GLCIC_FAST_WEIGHTS`` environment variable, else :class:`NoWeightsError`.
    Nets loaded from a path are cached (up to 4), keyed by the file's path, size and
    modification time, the device and the dtype.
    """
    from glcic_fast.nn.completion_net import CompletionNet
    from glcic_fast.nn.weights import load

    device, dtype = default_device(device), parse_dtype(dtype)
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV) or None
        if weights is None:
            raise NoWeightsError(
                "no weights: pass weights=<path to a checkpoint> (the authors' .t7, a GLCIC-PyTorch .pth, the "
                f"authors' converted .pth or glcic_fast .safetensors), set {WEIGHTS_ENV}, or pass "
                f"weights='{RANDOM}' for a randomly initialised net (its output is noise)")
    if isinstance(weights, CompletionNet):
        param = next(weights.parameters())
        if param.device == device and param.dtype == dtype:
            return weights
        import copy

        return copy.deepcopy(weights).to(device=device, dtype=dtype).eval()
    if isinstance(weights, str) and weights == RANDOM:
        return random_net().to(device=device, dtype=dtype).eval()
    key = None
    if isinstance(weights, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(weights))
        if os.path.isfile(path):
            stat = os.stat(path)
            key = (path, stat.st_size, stat.st_mtime_ns, str(device), dtype,
                   None if config is None or isinstance(config, dict) else os.fspath(config))
            if isinstance(config, dict):
                key = None  # a dict config is not hashable reliably: no caching
            elif key in _NET_CACHE:
                _NET_CACHE.move_to_end(key)
                return _NET_CACHE[key]
    net = load(weights, config).to(device=device, dtype=dtype).eval()
    if key is not None:
        _NET_CACHE[key] = net
        while len(_NET_CACHE) > _NET_CACHE_SIZE:
            _NET_CACHE.popitem(last=False)
    return net


def _image_tensor(image):
    """(tensor C x H x W or N x C x H x W in [0, 1], the numpy dtype and dimensions to give
    the result back in, or None for a tensor)."""
    from glcic_fast.imageio import array_to_tensor, read_image

    if isinstance(image, torch.Tensor):
        return image, None
    if isinstance(image, (str, os.PathLike)):
        return read_image(image), None
    if isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"a numpy image must be H x W, H x W x 3 (RGB) or H x W x 4 (RGBA), got {image.shape}")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"a numpy image must be uint8 or floating point in [0, 1], got {image.dtype}")
        return array_to_tensor(array), (image.dtype, image.ndim)
    raise TypeError(f"image must be a torch.Tensor, a numpy array or a path, got {type(image).__name__}")


def _mask_tensor(mask):
    from glcic_fast.imageio import mask_array_to_tensor, read_mask

    if isinstance(mask, torch.Tensor):
        return mask.float() if mask.dtype == torch.bool else mask
    if isinstance(mask, (str, os.PathLike)):
        return read_mask(mask)
    if isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(f"a numpy mask must be H x W, got {mask.shape}")
        return mask_array_to_tensor(mask)
    raise TypeError(f"mask must be a torch.Tensor, a numpy array or a path, got {type(mask).__name__}")


def complete(image, mask, weights=None, device=None, dtype=None, postprocess: bool = False, *,
             config=None, **kwargs):
    """Fill the holes of ``image``.

    Args:
        image: a tensor (C x H x W or N x C x H x W, floating point in [0, 1]; C = 3 RGB,
            1 gray or 4 RGBA), a numpy array (H x W [x C], uint8 or float in [0, 1]) or
            an image file's path.
        mask: a tensor (1 x H x W or N x 1 x H x W in [0, 1]), a numpy array (H x W,
            bool, uint8 or float) or a mask file's path; white / 1 / True = fill.
        weights: see :func:`get_net`: a path (anything :func:`glcic_fast.load` reads), a
            state dict, a CompletionNet, ``"random"``, or None for ``$GLCIC_FAST_WEIGHTS``.
        device: where the network runs; default CUDA when available, else the CPU.
        dtype: the network's dtype: float32 (default; the exactness guarantees are for
            it), float16 or bfloat16 (a converted copy of the net; for GPUs).
        postprocess: the paper's Telea + Poisson blend inside the holes (default False,
            which keeps the result exactly the network's output in the holes; the
            ``glcic-fast complete`` command line defaults to True).
        config: passed to :func:`glcic_fast.load` (GLCIC-PyTorch's config.json).
        **kwargs: ``mask_threshold``, ``roi``, ``tile``, ``max_pixels``: see
            :func:`glcic_fast.inference.completion.complete_with`.

    Returns:
        The completed image in the form given: a tensor on the input tensor's device
        and dtype, or a numpy array like the input. For a path, a float32 CPU tensor
        with the file's channels (1 gray, 3 RGB, 4 RGBA with its alpha kept).
    """
    from glcic_fast.imageio import tensor_to_array
    from glcic_fast.inference.completion import complete_with

    tensor, numpy_form = _image_tensor(image)
    mask_t = _mask_tensor(mask)
    if tensor.dim() == 4 and mask_t.dim() == 3:
        mask_t = mask_t.unsqueeze(0).expand(tensor.shape[0], -1, -1, -1)
    if device is None and isinstance(image, torch.Tensor) and image.device.type != "cpu":
        device = image.device
    net = get_net(weights, device, dtype, config)
    run_device = next(net.parameters()).device
    out = complete_with(net, tensor.to(run_device), mask_t.to(device=run_device, dtype=tensor.dtype),
                        postprocess=postprocess, **kwargs)
    if numpy_form is None:
        return out.to(tensor.device)
    dtype, ndim = numpy_form
    out = tensor_to_array(out, np.uint8) if dtype == np.uint8 else tensor_to_array(out, np.float32).astype(dtype)
    return out[..., 0] if ndim == 2 else out
