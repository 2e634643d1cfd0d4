"""Image files read to [0, 1] and written back as they came: 8-bit, 16-bit and float
samples; gray, RGB and RGBA channels. Files OpenCV's decoder refuses: a clear error."""

import re
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

import glcic_fast
from glcic_fast.inference.batching import decode_image
from glcic_fast.imageio import (file_sample_type, image_size, read_image, read_image_array, read_mask,
                                read_mask_array, read_rgb, write_image)

from photos import photo, save_jpeg_with_orientation


def _file(tmp_path, rgb_hwc, suffix):
    """Writes an H x W x C RGB(A) or H x W x 1 array as OpenCV stores it; returns the path."""
    conversion = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}.get(rgb_hwc.shape[2])
    data = cv2.cvtColor(rgb_hwc, conversion) if conversion is not None else rgb_hwc[..., 0]
    path = str(tmp_path / f"img{rgb_hwc.shape[2]}{suffix}")
    assert cv2.imwrite(path, data)
    return path


#: Gray, RGB and RGBA files with 8-bit, 16-bit and float samples.
EVERY_FILE_KIND = pytest.mark.parametrize("channels, dtype, scale, suffix", [
    (c, *depth) for c in (1, 3, 4)
    for depth in ((np.uint8, 255, ".png"), (np.uint16, 65535, ".png"), (np.float32, 1.0, ".tiff"))])


def _photo_array(channels, dtype, scale):
    rgb = photo("astronaut", 32, 40).permute(1, 2, 0).numpy()
    if channels == 1:
        rgb = rgb.mean(axis=2, keepdims=True)
    elif channels == 4:
        alpha = np.linspace(0, 1, rgb.shape[0] * rgb.shape[1], dtype=np.float32).reshape(*rgb.shape[:2], 1)
        rgb = np.concatenate([rgb, alpha], axis=2)
    return (rgb * scale).astype(dtype)


@EVERY_FILE_KIND
def test_read_keeps_channels_and_depth(tmp_path, channels, dtype, scale, suffix):
    data = _photo_array(channels, dtype, scale)
    path = _file(tmp_path, data, suffix)
    want = torch.from_numpy(data.astype(np.float32) / np.float32(scale)).permute(2, 0, 1)
    assert torch.equal(read_image(path), want)
    decoded, sample_type = decode_image(path)
    assert sample_type == np.dtype(dtype).name
    assert torch.equal(decoded.float() / 255 if decoded.dtype == torch.uint8 else decoded, want)
    rgb = read_rgb(path)  # always RGB
    assert rgb.shape == (3, 32, 40)
    assert torch.equal(rgb, want.expand(3, -1, -1) if channels == 1 else want[:3])


@EVERY_FILE_KIND
def test_write_round_trips_the_file(tmp_path, channels, dtype, scale, suffix):
    data = _photo_array(channels, dtype, scale)
    path = _file(tmp_path, data, suffix)
    again = str(tmp_path / f"again{suffix}")
    write_image(again, read_image(path), dtype)
    stored = cv2.imread(again, cv2.IMREAD_UNCHANGED)
    assert stored.dtype == dtype and (stored.ndim == 2) == (channels == 1)
    assert np.array_equal(stored, cv2.imread(path, cv2.IMREAD_UNCHANGED))  # sample for sample


def test_write_falls_back_to_what_the_format_holds(tmp_path):
    assert file_sample_type("a.jpg", np.uint16) == np.uint8
    assert file_sample_type("a.png", np.float32) == np.uint16
    assert file_sample_type("a.tif", np.float32) == np.float32
    image = torch.rand(3, 8, 8)
    write_image(tmp_path / "a.jpg", image, np.uint16)
    assert cv2.imread(str(tmp_path / "a.jpg"), cv2.IMREAD_UNCHANGED).dtype == np.uint8


def test_write_refuses_to_drop_alpha_or_guess_a_format(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        write_image(tmp_path / "a.jpg", torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match="image extension"):
        write_image(tmp_path / "a.txt", torch.rand(3, 8, 8))
    assert not list(tmp_path.iterdir())


def oversized_png(path, width=50000, height=50000):
    """A PNG whose header claims ``width`` x ``height`` pixels (50000 x 50000 is 2.5e9, over
    OpenCV's default decoder limit of 2^30 pixels) but holds a 4 x 4 image: a small valid
    PNG with its IHDR size and checksum patched, so that no big memory is needed. (The CLI
    tests import it from here.)"""
    ok, encoded = cv2.imencode(".png", np.full((4, 4, 3), 128, np.uint8))
    data = bytearray(encoded.tobytes())
    assert ok and data[12:16] == b"IHDR"  # 8-byte signature, then the IHDR chunk's length and type
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # over the chunk's type and data
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_a_file_over_the_decoder_limit_is_a_clear_error(tmp_path):
    big = oversized_png(tmp_path / "big.png")
    for read in (read_image_array, read_image, read_rgb, decode_image, image_size):
        with pytest.raises(ValueError, match=r"could not read an image from .*big\.png: it is larger than "
                                             r"OpenCV's image decoder accepts, at most 1073741824 \(2\^30\) pixels"):
            read(big)
    for read in (read_mask_array, read_mask):
        with pytest.raises(ValueError, match=r"could not read a mask from .*big\.png: .*CV_IO_MAX_IMAGE_PIXELS"):
            read(big)
    mask = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="big.png.*1073741824"):
        glcic_fast.complete(big, mask, weights="random", device="cpu")
    with pytest.raises(ValueError, match="big.png.*1073741824"):
        glcic_fast.complete(np.zeros((4, 4, 3), np.uint8), big, weights="random", device="cpu")


@pytest.mark.parametrize("width,height,limit", [(1_100_000, 4, "at most 1048576 (2^20) pixels wide"),
                                                (4, 1_100_000, "at most 1048576 (2^20) pixels high")])
def test_a_side_over_the_decoder_limit_is_refused_from_the_header(tmp_path, capfd, width, height, limit):
    """A side over OpenCV's width or height limit: its PNG decoder returns nothing rather
    than raise (and libpng prints its own lines), and Pillow reads such a header happily:
    both the size check and the decoder must give the limit's one-line error."""
    path = oversized_png(tmp_path / "long.png", width, height)
    for read in (image_size, read_image_array, read_mask_array):
        with pytest.raises(ValueError, match=r"long\.png: it is larger than OpenCV's image decoder accepts, " + re.escape(limit)):
            read(path)
    assert "libpng" not in capfd.readouterr().err


def test_the_decoder_limit_set_in_the_environment_is_the_one_checked(tmp_path, monkeypatch):
    path = _file(tmp_path, _photo_array(3, np.uint8, 255), ".png")  # 40 x 32 = 1280 pixels
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ValueError, match="at most 1000 pixels .*OPENCV_IO_MAX_IMAGE_PIXELS"):
        image_size(path)
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "2000")
    assert image_size(path) == (40, 32)


def test_image_size_reads_the_header(tmp_path):
    path = _file(tmp_path, _photo_array(3, np.uint8, 255), ".png")
    assert image_size(path) == (40, 32)
    (tmp_path / "not_an_image.png").write_bytes(b"text")
    with pytest.raises(ValueError, match="could not read an image from .*not_an_image.png"):
        image_size(tmp_path / "not_an_image.png")


def test_a_mask_is_read_as_stored_like_its_image(tmp_path):
    """A JPEG's EXIF orientation turns neither the image nor its mask: the holes stay on the
    pixels they mark (and the folder checks' header sizes agree with the decoded ones)."""
    pytest.importorskip("PIL.Image")
    data = np.zeros((40, 60), np.uint8)
    data[:10, :20] = 255
    path = str(tmp_path / "mask.jpg")
    save_jpeg_with_orientation(path, data, 6)  # shown turned 90 degrees clockwise
    assert read_mask_array(path).shape == read_image_array(path).shape[:2] == (40, 60)
    assert image_size(path) == (60, 40)
    assert read_mask(path)[0, :10, :20].min() > 0.9
