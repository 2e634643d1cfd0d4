"""Exact tiled inference: the network's output for any rectangle, computed in tiles.

The rectangle is cut into *cores* on a grid of multiples of 4; each core is grown by the
halo (:data:`glcic_fast.inference.roi.HALO`, the receptive-field radius rounded up to 4) with its
origin and end on multiples of 4, clipped at the padded image's border, and only the
core of each tile's output is kept. By the argument in :mod:`glcic_fast.inference.roi` each kept
pixel is the same float computation as in the whole image: bit-identical in fp32 (tested
on the CPU).

``complete(..., tile=T)`` uses cores of T x T pixels; ``complete(..., max_pixels=P)``
picks the largest core whose tile (core plus halo on both sides) has at most P pixels,
and tiles only when a crop is larger than that. Unless ``tile`` is given, a forward (whole
image, ROI crops or ``max_pixels`` tiles) that raises ``torch.cuda.OutOfMemoryError`` is
retried tiled: the CUDA cache is emptied and the core side starts at half the largest
crop's longer side (rounded to 4) and halves after each further out-of-memory error, down
to :data:`MIN_AUTO_CORE` before giving up (re-raising the error).
"""

import math
from typing import Callable, Iterable, Iterator, List, Optional, TypeVar

import torch

from glcic_fast.nn.architecture import SIZE_MULTIPLE
from glcic_fast.inference.roi import HALO, Box, expand

T = TypeVar("T")

#: The smallest core the out-of-memory fallback tries (tiles are then 376 x 376).
MIN_AUTO_CORE = 64


def _round_down(v: int) -> int:
    return (v // SIZE_MULTIPLE) * SIZE_MULTIPLE


def core_for_max_pixels(max_pixels: int, halo: int = HALO) -> int:
    """The largest core side (a multiple of 4) whose tile, core + 2 x halo on a side, has
    at most ``max_pixels`` pixels."""
    core = _round_down(int(math.isqrt(int(max_pixels))) - 2 * halo)
    if core < SIZE_MULTIPLE:
        smallest = (2 * halo + SIZE_MULTIPLE) ** 2
        raise ValueError(f"max_pixels={max_pixels} is too small for exact tiling: a tile needs at least "
                         f"{2 * halo + SIZE_MULTIPLE} x {2 * halo + SIZE_MULTIPLE} = {smallest} pixels "
                         f"(a {halo} px halo on each side of a 4 px core)")
    return core


def check_core(tile: int) -> int:
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < SIZE_MULTIPLE:
        raise ValueError(f"tile must be an int of at least {SIZE_MULTIPLE} (the core's side in pixels), got {tile!r}")
    return _round_down(tile)


def cores(target: Box, core: int) -> Iterator[Box]:
    """``target`` cut into cores of at most ``core`` x ``core`` pixels (``core`` a
    multiple of 4), as few as possible per axis and about the same size, boundaries on
    multiples of 4."""

    def splits(lo, hi):
        start = _round_down(lo)
        count = -(-(hi - start) // core)
        step = -(-(hi - start) // (count * SIZE_MULTIPLE)) * SIZE_MULTIPLE  # <= core, a multiple of 4
        return [(max(v, lo), min(v + step, hi)) for v in range(start, hi, step)]

    for y0, y1 in splits(target.y0, target.y1):
        for x0, x1 in splits(target.x0, target.x1):
            yield Box(y0, y1, x0, x1)


def tiles(target: Box, core: int, padded_height: int, padded_width: int) -> List[tuple]:
    """(core, tile) pairs covering ``target``; each tile is the input crop for its core."""
    return [(c, expand(c, padded_height, padded_width)) for c in cores(target, core)]


def run_tiled(forward: Callable[[Box], torch.Tensor], target: Box, core: int, padded_height: int,
              padded_width: int, out: torch.Tensor, out_origin=(0, 0)) -> None:
    """Writes the network's output for ``target`` into ``out`` (whose pixel ``(0, 0)`` is
    the padded frame's ``out_origin``; pixels of ``target`` outside ``out`` are dropped).
    ``forward(crop)`` returns the network's output for the input crop ``crop``."""
    oy, ox = out_origin
    oh, ow = out.shape[-2:]
    for c, t in tiles(target, core, padded_height, padded_width):
        y0, y1 = max(c.y0, oy), min(c.y1, oy + oh)
        x0, x1 = max(c.x0, ox), min(c.x1, ox + ow)
        if y0 >= y1 or x0 >= x1:
            continue
        y = forward(t)
        out[..., y0 - oy:y1 - oy, x0 - ox:x1 - ox] = y[..., y0 - t.y0:y1 - t.y0, x0 - t.x0:x1 - t.x0]


def auto_cores(crop: Box) -> Iterator[int]:
    """Core sides the out-of-memory fallback tries, largest first."""
    core = _round_down(max(crop.y1 - crop.y0, crop.x1 - crop.x0) // 2)
    while core >= MIN_AUTO_CORE:
        yield core
        core = _round_down(core // 2)


def empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_that_fits(attempts: Iterable[Callable[[], T]]) -> T:
    """The result of the first of ``attempts`` that does not run out of CUDA memory, trying
    them in turn: the out-of-memory fallback of whole-image, ROI and batched inference. The
    last attempt's ``torch.cuda.OutOfMemoryError`` propagates."""
    attempts = iter(attempts)
    attempt = next(attempts)
    while True:
        try:
            return attempt()
        except torch.cuda.OutOfMemoryError:
            attempt = next(attempts, None)
            if attempt is None:
                raise
        # Past the except block the error, and the failed attempt's tensors its traceback
        # holds, are released: only now can the cache hand their memory back.
        empty_cuda_cache()


def pick_core(tile: Optional[int], max_pixels: Optional[int], crop: Box) -> Optional[int]:
    """The core side to use for a crop, or None for one forward over the whole crop."""
    if tile is not None:
        return check_core(tile)
    if max_pixels is not None:
        core = core_for_max_pixels(max_pixels)
        return core if crop.area > max_pixels else None
    return None
