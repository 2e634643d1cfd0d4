"""The paper's post-processing (section 3.4): fast marching, then Poisson blending (OpenCV).

For each image:

1. the completed image is converted to 8-bit BGR;
2. ``telea = cv2.inpaint(completed, mask, 1, cv2.INPAINT_TELEA)``;
3. for each hole region (8-connected component of the mask), ``cv2.seamlessClone(
   completed, telea, region, centre, cv2.NORMAL_CLONE)``, with ``centre`` the middle of
   the region's bounding box, applied one region after the other.

Traps handled:

- an empty mask returns the input (seamlessClone fails on one);
- holes touching the image border: seamlessClone clears the mask's outermost ring of
  pixels and needs the region, placed at ``centre``, to fit in the image. The three images
  are padded by :data:`BORDER` pixels with a mirror border (``cv2.BORDER_REFLECT``, the
  mask too, so the hole continues into the mirror image and the blend sees a symmetric
  problem there), cloned, and cropped back;
- seamlessClone places the region's bounding box at ``centre - (w // 2, h // 2)``; the
  centre is computed that way, so the region is blended in place;
- seamlessClone writes into the mask it is given (OpenCV issue 12053): every call gets
  a fresh one;
- regions with no interior (every pixel on the region's outline, e.g. 1-2 px thick
  strokes) crash seamlessClone and would not be changed by it anyway (it keeps the
  destination on the mask's outline): they keep the Telea fill.

Pixels outside the holes are never changed: the tensor API puts the blended pixels into
the holes only, so the image outside the holes stays bit-for-bit the input. Inside the
holes the result is 8-bit (then scaled to [0, 1]).
"""

import cv2
import numpy as np
import torch

from glcic_fast.imageio import tensor_to_array

#: Mirror border put around the images before cloning.
BORDER = 8


def _regions(mask: np.ndarray):
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    for i in range(1, count):
        x, y, w, h, _ = (int(v) for v in stats[i])
        yield labels[y:y + h, x:x + w] == i, x, y, w, h


def blend(completed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Post-processes one 8-bit image.

    Args:
        completed: H x W x 3 uint8 (BGR, as OpenCV reads it), the network's completion.
        mask: H x W, nonzero = hole.

    Returns:
        H x W x 3 uint8: ``completed`` outside the holes, the blend inside them.
    """
    if completed.dtype != np.uint8 or completed.ndim != 3 or completed.shape[2] != 3:
        raise ValueError(f"blend() takes an H x W x 3 uint8 image, got {completed.dtype} {completed.shape}")
    mask = (np.asarray(mask) > 0).astype(np.uint8) * 255
    if mask.shape != completed.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {completed.shape[:2]} differ in size")
    if not mask.any():
        return completed.copy()
    completed = np.ascontiguousarray(completed)
    telea = cv2.inpaint(completed, mask, 1, cv2.INPAINT_TELEA)
    return clone_holes(completed, telea, mask)


def clone_holes(src: np.ndarray, dst: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``cv2.seamlessClone(src, dst, region, centre, NORMAL_CLONE)`` for each hole region
    of ``mask`` in turn, in place (each region's bounding box at the same place in
    ``src`` and ``dst``), safe at the image border. Returns ``dst`` with the holes
    replaced (``src`` and ``dst``: H x W x 3 uint8; ``mask``: H x W, nonzero = hole)."""
    mask = (np.asarray(mask) > 0).astype(np.uint8) * 255
    b = BORDER
    pad = lambda a: cv2.copyMakeBorder(np.ascontiguousarray(a), b, b, b, b, cv2.BORDER_REFLECT)
    src_p, result, mask_p = pad(src), pad(dst), pad(mask)
    # seamlessClone clears this ring itself; clearing it here keeps the bounding boxes
    # below equal to the ones it uses.
    mask_p[0, :] = mask_p[-1, :] = mask_p[:, 0] = mask_p[:, -1] = 0
    kernel = np.ones((3, 3), np.uint8)
    for region, x, y, w, h in _regions(mask_p):
        # A fresh mask per call: seamlessClone writes into the mask it is given.
        region_mask = np.zeros_like(mask_p)
        region_mask[y:y + h, x:x + w][region] = 255
        if not cv2.erode(region_mask[y:y + h, x:x + w], kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).any():
            continue  # no interior: seamlessClone would crash, and would change nothing
        centre = (x + w // 2, y + h // 2)
        try:
            result = cv2.seamlessClone(src_p, result, region_mask, centre, cv2.NORMAL_CLONE)
        except cv2.error:  # defensive: keep the destination for a region OpenCV rejects
            continue
    result = result[b:-b, b:-b]
    hole = mask > 0
    out = np.array(dst, copy=True)
    out[hole] = result[hole]
    return out


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """3 x H x W in [0, 1] (RGB) -> H x W x 3 uint8 BGR."""
    return np.ascontiguousarray(tensor_to_array(image)[..., ::-1])


def postprocess(completed: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The paper's blend for a completed N x 3 x H x W (or 3 x H x W) RGB tensor in [0, 1]
    and its hole mask (N x 1 x H x W, nonzero = hole). Returns a tensor like
    ``completed``, equal to it outside the holes (bit for bit)."""
    squeeze = completed.dim() == 3
    images = completed.unsqueeze(0) if squeeze else completed
    holes = hole.unsqueeze(0) if hole.dim() == 3 else hole
    out = images.clone()
    for i in range(images.shape[0]):
        m = (holes[i, 0] > 0).cpu().numpy()
        if not m.any():
            continue
        blended = blend(to_uint8(images[i]), m)
        rgb = torch.from_numpy(np.ascontiguousarray(blended[..., ::-1])).permute(2, 0, 1)
        rgb = rgb.to(device=images.device, dtype=images.dtype) / 255
        out[i] = torch.where(holes[i] > 0, rgb, images[i])
    return out[0] if squeeze else out
