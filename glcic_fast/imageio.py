"""Reading and writing images and masks as the tensors complete() takes (OpenCV)."""

import os

import cv2
import numpy as np
import torch


def read_image(path) -> torch.Tensor:
    """3 x H x W float32 RGB in [0, 1] (8- or 16-bit files; gray is repeated to RGB)."""
    data = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(f"could not read an image from {path}")
    scale = 65535.0 if data.dtype == np.uint16 else 255.0
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=2)
    else:
        data = cv2.cvtColor(data[..., :3], cv2.COLOR_BGR2RGB)
    return torch.from_numpy(data.astype(np.float32) / scale).permute(2, 0, 1).contiguous()


def read_mask(path) -> torch.Tensor:
    """1 x H x W float32 in [0, 1]; white (or any bright value) marks pixels to fill."""
    data = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise ValueError(f"could not read a mask from {path}")
    return torch.from_numpy(data.astype(np.float32) / 255.0)[None]


def write_image(path, image: torch.Tensor) -> None:
    """Writes a 3 x H x W tensor in [0, 1] as 8-bit."""
    rgb = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write an image to {path} (unknown extension or unwritable folder)")
