"""Exact region-of-interest inference: run the network only around the holes.

An output pixel of the completion network depends only on input pixels within the
receptive-field radius (:data:`RADIUS`, derived below from ``COMPLETION_LAYERS``). So the
network's output inside a hole is the same whether it sees the whole image or a crop of
the hole's bounding box plus a halo of at least that radius, provided that

- the crop's origin lies on a multiple of 4, so the grids of the two stride-2 convs and
  the two stride-2 deconvs line up with the whole image's;
- its size is a multiple of 4 (the network needs that);
- where the crop meets the border of the (padded) image it stops there, so that the
  network's own zero padding falls in the same place in both.

The image is first padded to multiples of 4 exactly as the whole-image path does
(replicate, bottom and right; see :mod:`glcic_fast.inference.completion`) and crops are taken in
that padded frame, so the hole pixels are the same float operations on the same values:
bit-identical in fp32 (tested on the CPU; on the GPU the convolution library may choose a
different algorithm for a different shape, which can change the last bits).

Crop planning: each 8-connected hole region gets its bounding box; two boxes are merged
when one crop around both costs no more than the two crops separately (the area of the
union crop is at most the sum of the two crops' areas), which is always the case for
holes whose halos overlap a lot, and is repeated until no pair qualifies. Images with
very many hole regions (more than :data:`MAX_REGIONS`) get one crop around all of them.

``complete(..., roi=None)`` takes this path when the crops' total area is at most
:data:`AUTO_FRACTION` (one half) of the padded image: clearly cheaper, with margin for the
per-crop overhead. ``roi=True`` forces it, ``roi=False`` never takes it.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from glcic_fast.nn.architecture import COMPLETION_LAYERS, SIZE_MULTIPLE

#: The automatic rule: take the ROI path when the crops cover at most this fraction of
#: the padded image.
AUTO_FRACTION = 0.5
#: More hole regions than this get a single crop around all of them (planning is
#: quadratic in the number of regions).
MAX_REGIONS = 256


def dependency_interval(p: int, layers=COMPLETION_LAYERS) -> Tuple[int, int]:
    """The input positions ``[lo, hi]`` (inclusive, along one axis) that output position
    ``p`` of the network depends on, ignoring the image border."""
    lo = hi = p
    for spec in reversed(layers):
        k, s, pad, d = spec.kernel_size, spec.stride, spec.padding, spec.dilation
        if spec.transposed:  # output o = i * s - pad + d * j for taps j in [0, k)
            lo, hi = -((-(lo + pad - d * (k - 1))) // s), (hi + pad) // s
        else:  # output o reads i = o * s - pad + d * j
            lo, hi = lo * s - pad, hi * s - pad + d * (k - 1)
    return lo, hi


def total_stride(layers=COMPLETION_LAYERS) -> int:
    stride = 1
    for spec in layers:
        if not spec.transposed:
            stride *= spec.stride
    return stride


def receptive_field_radius(layers=COMPLETION_LAYERS) -> int:
    """The largest distance between an output pixel and an input pixel it depends on.

    The dependency interval of an output pixel depends on its position modulo the total
    stride (4), so every phase is checked."""
    radius = 0
    for p in range(total_stride(layers)):
        lo, hi = dependency_interval(p, layers)
        radius = max(radius, p - lo, hi - p)
    return radius


#: Receptive-field radius of the completion network in pixels (153: SPEC.md's "about
#: 156" is half of its rounded 307 px receptive field).
RADIUS = receptive_field_radius()
#: The halo put around every crop: the radius rounded up to a multiple of 4.
HALO = -(-RADIUS // SIZE_MULTIPLE) * SIZE_MULTIPLE


@dataclass(frozen=True)
class Box:
    """Half-open rectangle ``[y0, y1) x [x0, x1)``."""
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def area(self) -> int:
        return max(0, self.y1 - self.y0) * max(0, self.x1 - self.x0)

    def union(self, other: "Box") -> "Box":
        return Box(min(self.y0, other.y0), max(self.y1, other.y1), min(self.x0, other.x0), max(self.x1, other.x1))

    def slices(self):
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def clipped(self, height: int, width: int) -> "Box":
        """The part inside an image of ``height`` x ``width`` that starts at (0, 0) (a
        target in the padded frame, cut back to the image)."""
        return Box(self.y0, min(self.y1, height), self.x0, min(self.x1, width))


def expand(box: Box, height: int, width: int, halo: int = HALO, multiple: int = SIZE_MULTIPLE) -> Box:
    """The crop that gives exact network outputs for ``box``: ``box`` plus ``halo`` on
    every side, origin rounded down and end rounded up to multiples of ``multiple``,
    clipped to the padded image ``[0, height) x [0, width)`` (both multiples of
    ``multiple``)."""
    if height % multiple or width % multiple:
        raise ValueError(f"the padded image must be a multiple of {multiple}, got {height} x {width}")
    if halo < RADIUS:
        raise ValueError(f"halo {halo} is smaller than the receptive-field radius {RADIUS}: not exact")
    down = lambda v: (v // multiple) * multiple
    up = lambda v: -(-v // multiple) * multiple
    return Box(max(0, down(box.y0 - halo)), min(height, up(box.y1 + halo)),
               max(0, down(box.x0 - halo)), min(width, up(box.x1 + halo)))


@dataclass(frozen=True)
class Region:
    """A group of holes and the crop computed for it: ``target`` is the bounding box of
    the holes, ``crop`` the input the network sees."""
    target: Box
    crop: Box


def hole_boxes(hole: np.ndarray) -> List[Box]:
    """Bounding boxes of the 8-connected regions of a 2-D boolean array."""
    import cv2

    count, _, stats, _ = cv2.connectedComponentsWithStats(hole.astype(np.uint8), connectivity=8)
    boxes = []
    for x, y, w, h, _ in stats[1:count]:
        boxes.append(Box(int(y), int(y + h), int(x), int(x + w)))
    return boxes


def _holes_in_bounding_box(hole):
    """(the boolean hole mask cut to the bounding box of its holes, as a numpy array, or
    None without holes; the box's origin (y, x); the mask's (H, W)). A tensor is reduced on
    its own device, so that only the box comes to the CPU: for one hole in a 4096 x 4096
    mask on the GPU that is the hole's pixels, not a 64 MB copy and a labelling of 16
    million pixels that would cost more than the network's forward on the crop."""
    if isinstance(hole, torch.Tensor):
        holes, to_numpy = hole.detach() > 0, lambda t: t.to("cpu").numpy()
    else:
        holes, to_numpy = np.asarray(hole) > 0, lambda a: a
    if holes.ndim != 2:
        raise ValueError(f"plan() takes a 2-D hole mask, got shape {tuple(holes.shape)}")
    h, w = holes.shape
    rows, cols = np.flatnonzero(to_numpy(holes.any(1))), np.flatnonzero(to_numpy(holes.any(0)))
    if rows.size == 0:
        return None, (0, 0), (h, w)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return np.ascontiguousarray(to_numpy(holes[y0:y1, x0:x1])), (y0, x0), (h, w)


def plan(hole, padded_height: Optional[int] = None, padded_width: Optional[int] = None,
         halo: int = HALO) -> List[Region]:
    """The crops for an H x W hole mask (anything ``bool()``-able per pixel; a batch's
    masks should be OR-ed first). ``padded_*`` default to H and W rounded up to 4."""
    holes, (y0, x0), (h, w) = _holes_in_bounding_box(hole)
    ph = padded_height or -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE
    pw = padded_width or -(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE
    if holes is None:
        return []
    # In raster order of their corners, whatever order the labelling returned them in.
    boxes = sorted((Box(b.y0 + y0, b.y1 + y0, b.x0 + x0, b.x1 + x0) for b in hole_boxes(holes)),
                   key=lambda b: (b.y0, b.x0, b.y1, b.x1))
    if len(boxes) > MAX_REGIONS:
        all_holes = boxes[0]
        for b in boxes[1:]:
            all_holes = all_holes.union(b)
        boxes = [all_holes]
    regions = [Region(b, expand(b, ph, pw, halo)) for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(regions)):
            for j in range(i + 1, len(regions)):
                a, b = regions[i], regions[j]
                crop = a.crop.union(b.crop)  # == expand(a.target.union(b.target)): expand is monotone
                if crop.area <= a.crop.area + b.crop.area:
                    regions[i] = Region(a.target.union(b.target), crop)
                    del regions[j]
                    merged = True
                    break
            if merged:
                break
    return regions


def crop_area(regions: Sequence[Region]) -> int:
    return sum(r.crop.area for r in regions)


def regions_to_run(hole, padded_height: int, padded_width: int, roi: Optional[bool] = None) -> List[Region]:
    """What completion runs the network on for an H x W ``hole`` mask (a batch's OR-ed):
    the ROI crops when ``roi`` is True, or when None and :func:`worthwhile`; else the whole
    padded image as one region."""
    if roi is not False:
        planned = plan(hole, padded_height, padded_width)
        if roi or worthwhile(planned, padded_height, padded_width):
            return planned
    whole = Box(0, padded_height, 0, padded_width)
    return [Region(whole, whole)]


def worthwhile(regions: Sequence[Region], padded_height: int, padded_width: int,
               fraction: float = AUTO_FRACTION) -> bool:
    """The automatic rule: ROI inference pays when the crops' total area is at most
    ``fraction`` of the padded image."""
    return bool(regions) and crop_area(regions) <= fraction * padded_height * padded_width
