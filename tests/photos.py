"""Real photographs for the tests (bundled with scikit-image), as complete()'s tensors."""

import cv2
import numpy as np
import torch


def photo(name: str, height: int, width: int) -> torch.Tensor:
    """skimage.data.<name>() resized to cover height x width (area interpolation), centre-
    cropped to exactly that size: 3 x H x W float32 RGB in [0, 1]."""
    import skimage.data

    rgb = getattr(skimage.data, name)()
    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    y, x = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    rgb = np.ascontiguousarray(rgb[y:y + height, x:x + width])
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)


def rect_mask(height: int, width: int, *rects) -> torch.Tensor:
    """1 x H x W mask, 1 inside each (y, x, h, w) rectangle (clipped to the image)."""
    mask = torch.zeros(1, height, width)
    for y, x, h, w in rects:
        mask[:, max(y, 0):y + h, max(x, 0):x + w] = 1
    return mask


def save_jpeg_with_orientation(path, pixels: np.ndarray, orientation: int, big_endian: bool = False):
    """Writes H x W (gray) or H x W x 3 (RGB) uint8 ``pixels`` as they are stored, as a JPEG
    (quality 100) whose EXIF orientation tag says how viewers should show them: 3 turned 180
    degrees, 6 turned 90 degrees clockwise, 8 counter-clockwise (a phone's photos). The EXIF
    block is little-endian as Pillow writes it, or big-endian ("MM") as iPhones do. Needs
    Pillow."""
    from PIL import Image

    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif.endian = ">" if big_endian else "<"
    exif[0x0112] = orientation
    image.save(str(path), exif=exif, quality=100)
