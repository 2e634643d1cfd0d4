"""Reading and writing images and masks as the tensors complete() takes (OpenCV).

An image keeps what its file holds: gray stays one channel, RGBA keeps its alpha, and a
16-bit or float file is written back with the same sample type where the output format
can store it. The network itself always sees RGB (:func:`glcic_fast.inference.completion.to_rgb`).
"""

import os

import cv2
import numpy as np
import torch

#: The file names taken for images when a folder is read (completion and training alike).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2")
#: Output formats OpenCV writes with 16-bit samples.
SIXTEEN_BIT_FORMATS = (".png", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".jp2")
#: Output formats OpenCV writes with float32 samples.
FLOAT_FORMATS = (".tif", ".tiff")
#: Output formats that can hold an alpha channel.
ALPHA_FORMATS = (".png", ".tif", ".tiff", ".webp")


def read_image_array(path) -> np.ndarray:
    """H x W x C in the file's own sample type (uint8, uint16 or float32), with C = 1
    (gray), 3 (RGB) or 4 (RGBA), channels in RGB order."""
    data = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(f"could not read an image from {path}")
    if data.ndim == 2:
        return data[..., None]
    if data.shape[2] == 4:
        return cv2.cvtColor(data, cv2.COLOR_BGRA2RGBA)
    if data.shape[2] == 3:
        return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    raise ValueError(f"{path} has {data.shape[2]} channels; expected gray, RGB or RGBA")


def full_scale(dtype) -> float:
    """The value that means 1.0 in an image array of ``dtype`` (float files are in [0, 1])."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def array_to_tensor(data: np.ndarray) -> torch.Tensor:
    """H x W x C image array -> C x H x W float32 in [0, 1]."""
    scaled = data.astype(np.float32) / np.float32(full_scale(data.dtype))
    return torch.from_numpy(scaled).permute(2, 0, 1).contiguous()


def read_image(path) -> torch.Tensor:
    """C x H x W float32 in [0, 1] with the file's channels (1 gray, 3 RGB, 4 RGBA)."""
    return array_to_tensor(read_image_array(path))


def read_rgb(path) -> torch.Tensor:
    """3 x H x W float32 RGB in [0, 1] (gray repeated, alpha dropped): what training reads."""
    image = read_image(path)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image[:3].contiguous()


def read_mask_array(path) -> np.ndarray:
    """H x W uint8 (the file read as gray); bright marks pixels to fill."""
    data = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise ValueError(f"could not read a mask from {path}")
    return data


def read_mask(path) -> torch.Tensor:
    """1 x H x W float32 in [0, 1]; white (or any bright value) marks pixels to fill."""
    return torch.from_numpy(read_mask_array(path).astype(np.float32) / 255.0)[None]


def check_writable(path, channels: int) -> None:
    """Raises ValueError if OpenCV cannot write a ``channels``-channel image to ``path``
    without losing something (the extension, or alpha in a format without one)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if not ext or (hasattr(cv2, "haveImageWriter") and not cv2.haveImageWriter(os.fspath(path))):
        raise ValueError(f"cannot write an image to {path}: use an image extension such as .png or .jpg")
    if channels == 4 and ext not in ALPHA_FORMATS:
        raise ValueError(f"cannot keep the alpha channel in {path}: write one of {', '.join(ALPHA_FORMATS)}")


def file_sample_type(path, sample_type) -> np.dtype:
    """The sample type ``path``'s format can store closest to ``sample_type``: float32 and
    16-bit where the format holds them, else 8-bit."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    sample_type = np.dtype(sample_type)
    if sample_type == np.float32 and ext in FLOAT_FORMATS:
        return sample_type
    if sample_type in (np.dtype(np.float32), np.dtype(np.uint16)) and ext in SIXTEEN_BIT_FORMATS:
        return np.dtype(np.uint16)
    return np.dtype(np.uint8)


def write_image(path, image: torch.Tensor, sample_type=np.uint8) -> None:
    """Writes a C x H x W tensor in [0, 1] (C = 1 gray, 3 RGB, 4 RGBA) with samples of
    ``sample_type`` (the input file's: uint8, uint16 or float32) where the format can
    store them (:func:`file_sample_type`)."""
    check_writable(path, image.shape[0])
    dtype = file_sample_type(path, sample_type)
    data = image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    if dtype != np.float32:
        data = np.floor(data * np.float32(full_scale(dtype)) + np.float32(0.5)).astype(dtype)
    conversion = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}.get(data.shape[2])
    data = cv2.cvtColor(data, conversion) if conversion is not None else data[..., 0]
    if not cv2.imwrite(os.fspath(path), data):
        raise ValueError(f"could not write an image to {path} (unwritable folder or unsupported format)")
