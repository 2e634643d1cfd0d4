"""Image files read to [0, 1] and written back as they came: 8-bit, 16-bit and float
samples; gray, RGB and RGBA channels."""

import cv2
import numpy as np
import pytest
import torch

from glcic_fast.inference.batching import decode_image
from glcic_fast.imageio import file_sample_type, read_image, read_rgb, write_image

from photos import photo


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
    rgb = read_rgb(path)  # what training reads: always RGB
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
