"""Completing images with a given net: the net's input convention, any image size, only
the holes replaced; region-of-interest and tiled inference; post-processing.

:func:`complete_with` takes the net (``CompletionNet.complete`` calls it). The module-level
``glcic_fast.complete`` (:mod:`glcic_fast.inference.api`) loads weights for you.
"""

import itertools
from typing import Optional

import torch

from glcic_fast.inference import roi as _roi
from glcic_fast.inference import tiling as _tiling
from glcic_fast.nn.architecture import SIZE_MULTIPLE
from glcic_fast.inference.roi import Box

#: ITU-R BT.601 luma, the weights cv2.COLOR_RGB2GRAY uses: how a gray input's completed
#: RGB goes back to one channel.
LUMA = (0.299, 0.587, 0.114)


def _as_batch(t: torch.Tensor, name: str, channels) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] not in channels:
        if name == "image":
            want = "3 x H x W (RGB), 1 x H x W (gray) or 4 x H x W (RGBA), optionally with a batch dim N in front"
        else:
            want = "1 x H x W or N x 1 x H x W"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.shape[-2] == 0 or t.shape[-1] == 0:
        raise ValueError(f"{name} is {t.shape[-2]} pixels high and {t.shape[-1]} wide (shape {tuple(t.shape)}): "
                         "expected at least 1 x 1 pixels")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point with values in [0, 1], got {t.dtype} "
                        f"(for 8-bit images use tensor.float() / 255)")
    return t


def _check_values(t: torch.Tensor, name: str):
    if t.numel() == 0:  # a batch of no images: nothing to check (min and max have no value)
        return
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"{name} values must lie in [0, 1], got [{t.min().item():.4g}, {t.max().item():.4g}]")


def padded_size(h: int, w: int):
    """H and W rounded up to multiples of 4: the frame the network runs in."""
    return -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE


def run_network(net, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` read back as an RGB image in [0, 1] (``net.output_to_image``: mmagic's
    nets output BGR in [-1, 1]): the one call through which completion runs the network
    (the tests put a pointwise stand-in here to check the crop and tile geometry alone).
    Every backend computes an output pixel the same way wherever it lies in the tensor
    (the torch backend's sigmoid sees to it on the CPU), and the mapping is pointwise, so
    crops and tiles reproduce the whole image bit for bit where the convolution library
    does the same."""
    return net.output_to_image(net(x))


class NetworkInput:
    """The network's input for the whole image, padded to multiples of 4 by replicating
    the bottom row and right column, produced lazily one crop at a time (a crop of the
    padded input; the same values as padding the whole input and cropping it)."""

    def __init__(self, net, image: torch.Tensor, hole: torch.Tensor, dtype: torch.dtype):
        self.net, self.image, self.hole, self.dtype = net, image, hole, dtype
        self.height, self.width = image.shape[-2:]
        self.padded_height, self.padded_width = padded_size(self.height, self.width)

    def crop(self, box: Box) -> torch.Tensor:
        h, w = self.height, self.width
        image, hole = self.image, self.hole
        if box.y1 <= h and box.x1 <= w:
            ys, xs = box.slices()
            image, hole = image[..., ys, xs], hole[..., ys, xs]
        else:  # replicate padding: indices past the last row / column read the last one
            dev = image.device
            rows = torch.arange(box.y0, box.y1, device=dev).clamp_(max=h - 1)
            cols = torch.arange(box.x0, box.x1, device=dev).clamp_(max=w - 1)
            image = image.index_select(-2, rows).index_select(-1, cols)
            hole = hole.index_select(-2, rows).index_select(-1, cols)
        return self.net.prepare_input(image.to(self.dtype), hole.to(self.dtype))

    def whole(self) -> Box:
        return Box(0, self.padded_height, 0, self.padded_width)


def network_output(net, image: torch.Tensor, hole: torch.Tensor, *, roi: Optional[bool] = None,
                   tile: Optional[int] = None, max_pixels: Optional[int] = None) -> torch.Tensor:
    """The network's output (N x 3 x H x W, net's dtype) at every pixel the result needs:
    all of them on the whole-image path, the holes (at least) on the ROI path (zeros
    elsewhere). Exactly the whole-image forward's values wherever it computes them.
    Runs under inference_mode with the net in whatever mode it is in (eval)."""
    param = next(net.parameters())
    inp = NetworkInput(net, image, hole, param.dtype)
    ph, pw = inp.padded_height, inp.padded_width
    h, w = inp.height, inp.width

    regions = _roi.regions_to_run(hole.amax(dim=(0, 1)), ph, pw, roi)

    def forward(crop: Box) -> torch.Tensor:
        return run_network(net, inp.crop(crop))

    def run(core_for):
        whole = regions[0].crop == inp.whole() and len(regions) == 1
        if whole and core_for(regions[0].crop) is None:
            return forward(inp.whole())[..., :h, :w]  # the plain whole-image forward
        out = torch.zeros(image.shape[0], 3, h, w, dtype=param.dtype, device=param.device)
        for region in regions:
            core = core_for(region.crop)
            if core is None:
                y = forward(region.crop)
                t, c = region.target.clipped(h, w), region.crop
                out[..., t.y0:t.y1, t.x0:t.x1] = y[..., t.y0 - c.y0:t.y1 - c.y0, t.x0 - c.x0:t.x1 - c.x0]
            else:
                _tiling.run_tiled(forward, region.target, core, ph, pw, out)
        return out

    fixed = lambda crop: _tiling.pick_core(tile, max_pixels, crop)
    if tile is not None:
        return run(fixed)
    largest = max(regions, key=lambda r: r.crop.area).crop
    tiled = (lambda core=core: run(lambda crop: core) for core in _tiling.auto_cores(largest))
    return _tiling.first_that_fits(itertools.chain([lambda: run(fixed)], tiled))


def complete_with(net, image: torch.Tensor, mask: torch.Tensor, *, mask_threshold: float = 0.5,
                  roi: Optional[bool] = None, tile: Optional[int] = None, max_pixels: Optional[int] = None,
                  postprocess: bool = False) -> torch.Tensor:
    """The image with its holes filled by ``net``.

    Args:
        image: C x H x W or N x C x H x W, floating point in [0, 1], any H x W, with
            C = 3 (RGB), 1 (gray: repeated to RGB for the network, the result converted
            back with BT.601 luma) or 4 (RGBA: the RGB channels are completed, alpha is
            returned untouched).
        mask: 1 x H x W or N x 1 x H x W in [0, 1], 1 = pixel to fill. A soft mask is
            made binary: pixels with mask > ``mask_threshold`` (default 0.5) are holes.
        mask_threshold: see ``mask``; the authors' scripts use 0.2 on resized masks.
        roi: region-of-interest inference (:mod:`glcic_fast.inference.roi`): run the network only
            on crops around the holes. None (default) chooses it when the crops' total
            area is at most half the image; True always; False never. The hole pixels
            are the same either way.
        tile: run the network in tiles with cores of ``tile`` x ``tile`` pixels
            (:mod:`glcic_fast.inference.tiling`); exact, for images larger than memory.
        max_pixels: tile only crops larger than this many pixels, with the largest tiles
            that fit. Unless ``tile`` is given, a forward that runs out of CUDA memory
            is retried in smaller tiles, automatically.
        postprocess: the paper's blend (:mod:`glcic_fast.inference.postprocess`: Telea, then
            Poisson per hole region, OpenCV, 8-bit inside the holes). Default False:
            the result is then exactly the network's output in the holes. The
            ``glcic-fast complete`` command line applies it unless ``--no-postprocess``.

    Returns:
        A tensor shaped like ``image`` (same dtype and device), equal to ``image``
        outside the holes (bit for bit, post-processed or not) and to the network's
        output inside them. An empty mask returns a copy of ``image`` without running
        the network.

    The network runs in eval mode (restored afterwards) under inference_mode, in the net's
    parameter dtype. H and W are padded up to multiples of 4 by replicating the border
    (never resampled), and the result is cropped back. Whole image, ROI and tiled
    inference give the same network output (bit-identical in fp32 on the CPU, where it
    is tested; on the GPU the convolution library may pick a different algorithm per
    shape, which can change the last bits).
    """
    image_in = image
    image = _as_batch(image, "image", (1, 3, 4))
    squeeze = image_in.dim() == 3
    mask = _as_batch(mask, "mask", (1,))
    if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} must have the same N, H and W")
    param = next(net.parameters())
    if image.device != param.device or mask.device != param.device:
        raise ValueError(f"image ({image.device}) and mask ({mask.device}) must be on the net's device ({param.device})")
    _check_values(image, "image")
    _check_values(mask, "mask")
    if not 0 <= mask_threshold < 1:
        raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold}")
    if roi not in (None, True, False):
        raise ValueError(f"roi must be None (automatic), True or False, got {roi!r}")
    if tile is not None:
        _tiling.check_core(tile)
    if max_pixels is not None:
        _tiling.core_for_max_pixels(max_pixels)

    hole_bool = mask > mask_threshold
    if not hole_bool.any():
        result = image.clone()
        return result[0] if squeeze else result

    rgb = to_rgb(image)
    hole = hole_bool.to(image.dtype)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            out = network_output(net, rgb, hole, roi=roi, tile=tile, max_pixels=max_pixels).to(image.dtype)
    finally:
        net.train(was_training)
    completed = torch.where(hole_bool, out, rgb)
    if postprocess:
        from glcic_fast.inference.postprocess import postprocess as _postprocess

        completed = _postprocess(completed, hole_bool)
    result = from_rgb(completed, image, hole_bool)
    return result[0] if squeeze else result


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """The RGB the network completes, from an N x C x H x W (or C x H x W) image with
    C = 1 (gray, repeated), 3 or 4 (alpha left out)."""
    channels = image.shape[-3]
    if channels == 1:
        return image.expand(*image.shape[:-3], 3, -1, -1)
    return image[..., :3, :, :] if channels == 4 else image


def from_rgb(completed: torch.Tensor, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """``completed`` (RGB, equal to ``image``'s RGB outside ``hole``) back in ``image``'s
    channels: gray through BT.601 luma inside the holes (outside them the input's own
    values), RGBA with the input's alpha untouched."""
    channels = image.shape[-3]
    if channels == 1:
        luma = torch.tensor(LUMA, dtype=completed.dtype, device=completed.device).view(3, 1, 1)
        gray = (completed * luma).sum(dim=-3, keepdim=True).clamp_(0, 1)
        return torch.where(hole, gray.to(image.dtype), image)
    if channels == 4:
        return torch.cat([completed.to(image.dtype), image[..., 3:, :, :]], dim=-3)
    return completed
