"""Hole masks from a mask file and/or (x, y, w, h) rectangles, for an image of a known size.

One place for the rules, so that ``glcic-fast complete`` (one image or a folder), the
folder pipeline (:mod:`glcic_fast.inference.batching`), ``glcic-fast bench`` and the figure
script accept and refuse the same masks with the same messages: a mask file must have its
image's size; a rectangle is clipped to the image, and one that misses the image entirely
is an error (it would leave the picture unchanged while the caller expects a hole filled).
"""

from typing import Optional, Sequence, Tuple

import torch

from glcic_fast.imageio import mask_array_to_tensor, read_mask_array

Rect = Tuple[int, int, int, int]  # x, y, w, h


def parse_rect(text: str) -> Rect:
    """``"x,y,w,h"`` -> (x, y, w, h); ValueError saying what was wrong."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected x,y,w,h (four integers), got {text!r}") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise ValueError(f"a rectangle needs x, y >= 0 and w, h > 0, got {text!r}")
    return x, y, w, h


def rect_text(rect: Rect) -> str:
    """``x,y,w,h``, as ``--rect`` takes it."""
    return ",".join(str(v) for v in rect)


def clip_rect(rect: Rect, height: int, width: int, image="the image") -> Rect:
    """``rect`` (x, y, w, h) clipped to a ``width`` x ``height`` image. ValueError when it
    does not overlap the image (or is empty), naming the rectangle and the image's size."""
    x, y, w, h = rect
    if w <= 0 or h <= 0:
        raise ValueError(f"a rectangle x,y,w,h needs w, h > 0, got {rect_text(rect)}")
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"rectangle {rect_text(rect)} (x,y,w,h) lies wholly outside {image}, which is "
                         f"{width} x {height} pixels: it would fill nothing (x must be below {width}, "
                         f"y below {height})")
    return x0, y0, x1 - x0, y1 - y0


def rect_mask(height: int, width: int, rects: Sequence[Rect], image="the image") -> torch.Tensor:
    """1 x H x W uint8 mask, 255 inside each rectangle (clipped; see :func:`clip_rect`)."""
    mask = torch.zeros(1, height, width, dtype=torch.uint8)
    for rect in rects:
        x, y, w, h = clip_rect(rect, height, width, image)
        mask[:, y:y + h, x:x + w] = 255
    return mask


def hole_mask(height: int, width: int, path=None, rects: Sequence[Rect] = (), *, image="the image",
              keep_8bit: bool = False) -> torch.Tensor:
    """The holes of ``image`` (``width`` x ``height``): the mask file at ``path`` (read as
    gray, bright = fill; it must be the image's size) and the ``rects``, together. 1 x H x W
    float32 in [0, 1], or uint8 (255 = fill) with ``keep_8bit``. ``image`` names the image in
    error messages."""
    mask: Optional[torch.Tensor] = None
    if path is not None:
        data = read_mask_array(path)
        if data.shape != (height, width):
            raise ValueError(f"mask {path} is {data.shape[1]} x {data.shape[0]} but image {image} is "
                             f"{width} x {height}")
        mask = mask_array_to_tensor(data, keep_8bit=True)
    if rects or mask is None:
        drawn = rect_mask(height, width, rects, image)
        mask = drawn if mask is None else torch.maximum(mask, drawn)
    return mask if keep_8bit else mask.float() / 255
