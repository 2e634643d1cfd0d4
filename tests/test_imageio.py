"""Image files of every depth read to [0, 1]: 8-bit, 16-bit and float."""

import cv2
import numpy as np
import pytest
import torch

from glcic_fast.batching import decode_image
from glcic_fast.imageio import read_image

from photos import photo


@pytest.mark.parametrize("dtype, scale, suffix", [(np.uint8, 255, ".png"), (np.uint16, 65535, ".png"),
                                                  (np.float32, 1.0, ".tiff")])
def test_read_image_depths(tmp_path, dtype, scale, suffix):
    rgb = photo("astronaut", 32, 40)  # 3 x 32 x 40 float in [0, 1]
    data = (rgb.permute(1, 2, 0).numpy() * scale).astype(dtype)
    path = str(tmp_path / f"img{suffix}")
    assert cv2.imwrite(path, cv2.cvtColor(data, cv2.COLOR_RGB2BGR))
    want = torch.from_numpy(data.astype(np.float32) / scale).permute(2, 0, 1)
    assert torch.equal(read_image(path), want)
    decoded = decode_image(path)
    assert torch.equal(decoded.float() / 255 if decoded.dtype == torch.uint8 else decoded, want)
