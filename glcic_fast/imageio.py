"""Reading and writing images and masks as the tensors complete() takes (OpenCV)."""

import os

import cv2
import numpy as np
import torch


def read_rgb_array(path) -> np.ndarray:
    """H x W x 3 RGB in the file's own dtype (gray is repeated to RGB, alpha dropped)."""
    data = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(f"could not read an image from {path}")
    if data.ndim == 2:
        return np.repeat(data[..., None], 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(data[..., :3]), cv2.COLOR_BGR2RGB)


def full_scale(dtype) -> float:
    """The value that means 1.0 in an image array of ``dtype`` (float files are in [0, 1])."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def read_image(path) -> torch.Tensor:
    """3 x H x W float32 RGB in [0, 1] (8-bit, 16-bit or float files)."""
    data = read_rgb_array(path)
    return torch.from_numpy(data.astype(np.float32) / full_scale(data.dtype)).permute(2, 0, 1).contiguous()


def read_mask_array(path) -> np.ndarray:
    """H x W uint8 (the file read as gray); bright marks pixels to fill."""
    data = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise ValueError(f"could not read a mask from {path}")
    return data


def read_mask(path) -> torch.Tensor:
    """1 x H x W float32 in [0, 1]; white (or any bright value) marks pixels to fill."""
    return torch.from_numpy(read_mask_array(path).astype(np.float32) / 255.0)[None]


def write_image(path, image: torch.Tensor) -> None:
    """Writes a 3 x H x W tensor in [0, 1] as 8-bit."""
    rgb = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write an image to {path} (unknown extension or unwritable folder)")
