"""Completing images: the net's input convention, any image size, only holes replaced."""

import torch
import torch.nn.functional as F

from .architecture import SIZE_MULTIPLE


def _as_batch(t: torch.Tensor, name: str, channels: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] != channels:
        raise ValueError(f"{name} must be {channels} x H x W or N x {channels} x H x W, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point with values in [0, 1], got {t.dtype} "
                        f"(for 8-bit images use tensor.float() / 255)")
    return t


def _check_values(t: torch.Tensor, name: str):
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"{name} values must lie in [0, 1], got [{t.min().item():.4g}, {t.max().item():.4g}]")


def complete(net, image: torch.Tensor, mask: torch.Tensor, *, mask_threshold: float = 0.5) -> torch.Tensor:
    """The image with its holes filled by ``net``.

    Args:
        image: 3 x H x W or N x 3 x H x W, floating point in [0, 1], any H x W.
        mask: 1 x H x W or N x 1 x H x W in [0, 1], 1 = pixel to fill. A soft mask is
            made binary: pixels with mask > ``mask_threshold`` (default 0.5) are holes.
        mask_threshold: see ``mask``; the authors' scripts use 0.2 on resized masks.

    Returns:
        A tensor shaped like ``image`` (same dtype and device) equal to ``image``
        outside the holes and to the network's output inside them. An empty mask
        returns a copy of ``image`` without running the network.

    The network runs in eval mode (restored afterwards) under inference_mode, in the net's
    parameter dtype. H and W are padded up to multiples of 4 by replicating the border
    (never resampled), and the result is cropped back.
    """
    image_in = image
    image = _as_batch(image, "image", 3)
    squeeze = image_in.dim() == 3
    mask = _as_batch(mask, "mask", 1)
    if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} must have the same N, H and W")
    param = next(net.parameters())
    if image.device != param.device or mask.device != param.device:
        raise ValueError(f"image ({image.device}) and mask ({mask.device}) must be on the net's device ({param.device})")
    _check_values(image, "image")
    _check_values(mask, "mask")
    if not 0 <= mask_threshold < 1:
        raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold}")

    hole = (mask > mask_threshold).to(image.dtype)
    if not hole.any():
        result = image.clone()
        return result[0] if squeeze else result

    h, w = image.shape[-2:]
    pad_h, pad_w = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
    x = net.prepare_input(image.to(param.dtype), hole.to(param.dtype))
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            out = net(x)[..., :h, :w].to(image.dtype)
    finally:
        net.train(was_training)
    result = image * (1 - hole) + out * hole
    return result[0] if squeeze else result
