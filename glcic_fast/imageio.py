"""Reading and writing images and masks as the tensors complete() takes (OpenCV).

An image keeps what its file holds: gray stays one channel, RGBA keeps its alpha, and a
16-bit or float file is written back with the same sample type where the output format
can store it. The network itself always sees RGB (:func:`glcic_fast.inference.completion.to_rgb`).
"""

import io
import os
import warnings
from typing import NamedTuple, Optional, Tuple

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


#: OpenCV's decoder refuses an image whose header declares more than these: (what is
#: limited, the limit's name in OpenCV, the environment variable that sets it, its default).
#: It raises cv2.error naming the limit, caught in :func:`_imread`.
_DECODER_LIMITS = (("pixels", "CV_IO_MAX_IMAGE_PIXELS", "OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30),
                   ("pixels wide", "CV_IO_MAX_IMAGE_WIDTH", "OPENCV_IO_MAX_IMAGE_WIDTH", 1 << 20),
                   ("pixels high", "CV_IO_MAX_IMAGE_HEIGHT", "OPENCV_IO_MAX_IMAGE_HEIGHT", 1 << 20))


def _limit(variable: str, default: int) -> int:
    try:
        return int(os.environ[variable])
    except (KeyError, ValueError):
        return default


def _too_large(path, what: str, unit: str, name: str, variable: str, default: int) -> ValueError:
    limit = os.environ.get(variable, f"{default} (2^{default.bit_length() - 1})")
    return ValueError(f"could not read {what} from {path}: it is larger than OpenCV's image decoder accepts, "
                      f"at most {limit} {unit} ({name}; the environment variable {variable} sets another limit)")


def check_decoder_limits(path, width: int, height: int, what: str = "an image") -> None:
    """Raise the decoder's own error for a ``width`` x ``height`` image (as its header
    declares) over OpenCV's limits, so that a size read without decoding is refused
    exactly where decoding would refuse it."""
    for unit, name, variable, default in _DECODER_LIMITS:
        value = {"pixels": width * height, "pixels wide": width, "pixels high": height}[unit]
        if value > _limit(variable, default):
            raise _too_large(path, what, unit, name, variable, default)


class Upload(NamedTuple):
    """An image or mask file's bytes held in memory (an HTTP upload), with the name error
    messages give it. Every reader here takes one wherever it takes a path."""
    data: bytes
    name: str

    def __str__(self):
        return self.name


def _header_size(path) -> Optional[Tuple[int, int]]:
    """(width, height) from the file's header when Pillow is installed and reads the
    format, else None."""
    try:
        from PIL import Image

        with warnings.catch_warnings():
            # Only the header is read here: Pillow's warning about large images does not apply.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path.data) if isinstance(path, Upload) else path) as im:
                return im.size
    except Exception:  # no Pillow, a format it does not read, one it refuses: the caller decodes
        return None


def _imread(path, flags, what: str) -> np.ndarray:
    """cv2.imread (cv2.imdecode for an :class:`Upload`), with every way it fails as a
    one-line ValueError naming the file."""
    size = _header_size(path)
    if size is not None:  # first, so that libpng does not print its own complaint to stderr
        check_decoder_limits(path, *size, what=what)
    try:
        if isinstance(path, Upload):
            data = cv2.imdecode(np.frombuffer(path.data, np.uint8), flags) if path.data else None
        else:
            data = cv2.imread(os.fspath(path), flags)
    except cv2.error as exc:
        detail = " ".join(str(exc).split())
        for unit, name, variable, default in _DECODER_LIMITS:
            if name in detail:
                raise _too_large(path, what, unit, name, variable, default) from None
        raise ValueError(f"could not read {what} from {path}: OpenCV's decoder failed: {detail}") from None
    if data is None:
        raise ValueError(f"could not read {what} from {path}")
    return data


def read_image_array(path) -> np.ndarray:
    """H x W x C in the file's own sample type (uint8, uint16 or float32), with C = 1
    (gray), 3 (RGB) or 4 (RGBA), channels in RGB order."""
    data = _imread(path, cv2.IMREAD_UNCHANGED, "an image")
    if data.ndim == 2:
        return data[..., None]
    if data.shape[2] == 4:
        return cv2.cvtColor(data, cv2.COLOR_BGRA2RGBA)
    if data.shape[2] == 3:
        return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    raise ValueError(f"{path} has {data.shape[2]} channels; expected gray, RGB or RGBA")


def image_size(path) -> Tuple[int, int]:
    """(width, height) of an image or mask file: from its header when Pillow reads the
    format (checked against the decoder's limits), else by decoding it. Either way a file
    the decoder would refuse raises :func:`read_image_array`'s error: folder runs check
    every file this way before writing anything."""
    size = _header_size(path)
    if size is not None:
        check_decoder_limits(path, *size)
        return size
    data = read_image_array(path)
    return data.shape[1], data.shape[0]


def full_scale(dtype) -> float:
    """The value that means 1.0 in an image array of ``dtype`` (float files are in [0, 1])."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def array_to_tensor(data: np.ndarray, keep_8bit: bool = False) -> torch.Tensor:
    """H x W x C image array (uint8, uint16 or floating point in [0, 1]) -> C x H x W
    float32 in [0, 1]; with ``keep_8bit`` an 8-bit array stays uint8 (a quarter of the bytes
    to move between processes)."""
    t = torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1)
    if keep_8bit and data.dtype == np.uint8:
        return t.contiguous()
    return (t.float() / full_scale(data.dtype)).contiguous()


def mask_array_to_tensor(data: np.ndarray, keep_8bit: bool = False) -> torch.Tensor:
    """H x W mask array -> 1 x H x W float32 in [0, 1] (bool: 1 for True; uint8: / 255;
    floating point as is); with ``keep_8bit`` a uint8 mask stays uint8."""
    if data.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(data))[None]
        return t if keep_8bit else t.float() / 255
    if data.dtype == bool or np.issubdtype(data.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    raise TypeError(f"a numpy mask must be bool, uint8 or floating point, got {data.dtype}")


def tensor_to_array(image: torch.Tensor, sample_type=np.uint8) -> np.ndarray:
    """C x H x W tensor in [0, 1] -> H x W x C array (on the CPU) of ``sample_type``: uint8
    or uint16 rounded to the nearest level, float32 as is (clamped to [0, 1])."""
    data = np.ascontiguousarray(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    sample_type = np.dtype(sample_type)
    if sample_type == np.float32:
        return data
    return np.floor(data * np.float32(full_scale(sample_type)) + np.float32(0.5)).astype(sample_type)


def read_image(path) -> torch.Tensor:
    """C x H x W float32 in [0, 1] with the file's channels (1 gray, 3 RGB, 4 RGBA)."""
    return array_to_tensor(read_image_array(path))


def read_rgb(path) -> torch.Tensor:
    """3 x H x W float32 RGB in [0, 1] (gray repeated, alpha dropped): the photo
    ``glcic-fast bench`` times. (Training decodes its data set itself, in
    glcic_fast.training.data.read_image: 8-bit, EXIF orientation applied.)"""
    image = read_image(path)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image[:3].contiguous()


def read_mask_array(path) -> np.ndarray:
    """H x W uint8 (the file read as gray); bright marks pixels to fill. Pixels as stored,
    like images (IMREAD_UNCHANGED): not turned by an EXIF orientation, which would move the
    holes off the pixels they mark."""
    return _imread(path, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION, "a mask")


def read_mask(path) -> torch.Tensor:
    """1 x H x W float32 in [0, 1]; white (or any bright value) marks pixels to fill."""
    return mask_array_to_tensor(read_mask_array(path))


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
    if not cv2.imwrite(os.fspath(path), _file_array(path, image, sample_type)):
        raise ValueError(f"could not write an image to {path} (unwritable folder or unsupported format)")


def encode_image(image: torch.Tensor, extension: str = ".png", sample_type=np.uint8) -> bytes:
    """The bytes of the file :func:`write_image` would write with this ``extension``."""
    name = "image" + extension
    ok, encoded = cv2.imencode(extension, _file_array(name, image, sample_type))
    if not ok:
        raise ValueError(f"could not encode an image as {extension}")
    return encoded.tobytes()


def _file_array(path, image: torch.Tensor, sample_type) -> np.ndarray:
    """``image`` as the array OpenCV writes to ``path``: its sample type, BGR(A) order."""
    check_writable(path, image.shape[0])
    data = tensor_to_array(image, file_sample_type(path, sample_type))
    conversion = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}.get(data.shape[2])
    return cv2.cvtColor(data, conversion) if conversion is not None else data[..., 0]
