"""Hole masks from mask files and rectangles: clipped to the image, never silently empty,
a mask file of another size refused; the bundled example's mask is the figure's."""

import cv2
import numpy as np
import pytest
import torch

from glcic_fast.inference.bench import EXAMPLE_MASK
from glcic_fast.inference.masks import clip_rect, hole_mask, rect_mask


def test_rectangles_are_clipped_to_the_image():
    assert clip_rect((10, 20, 30, 40), 64, 90) == (10, 20, 30, 40)
    assert clip_rect((70, 50, 30, 30), 64, 90) == (70, 50, 20, 14)
    assert clip_rect((-5, -5, 10, 10), 64, 90) == (0, 0, 5, 5)
    mask = rect_mask(64, 90, [(70, 50, 30, 30), (0, 0, 2, 3)])
    want = torch.zeros(1, 64, 90, dtype=torch.uint8)
    want[:, 50:, 70:] = want[:, :3, :2] = 255
    assert torch.equal(mask, want)


@pytest.mark.parametrize("rect", [(90, 10, 5, 5), (10, 64, 5, 5), (200, 200, 1, 1), (-10, 0, 10, 5)])
def test_a_rectangle_wholly_outside_is_an_error(rect):
    text = ",".join(map(str, rect))
    with pytest.raises(ValueError, match=f"rectangle {text} .*wholly outside cat.png, which is 90 x 64 pixels"):
        rect_mask(64, 90, [(1, 1, 2, 2), rect], image="cat.png")


def test_an_empty_rectangle_is_an_error():
    with pytest.raises(ValueError, match="needs w, h > 0, got 1,1,0,5"):
        clip_rect((1, 1, 0, 5), 64, 90)


def test_mask_file_and_rectangles_together(tmp_path):
    data = np.zeros((64, 90), np.uint8)
    data[5:10, 5:10] = 255
    data[20, 20] = 100  # a soft value stays as it is
    cv2.imwrite(str(tmp_path / "m.png"), data)
    mask = hole_mask(64, 90, tmp_path / "m.png", [(40, 40, 10, 10)], image="cat.png")
    assert mask.dtype == torch.float32 and mask.shape == (1, 64, 90)
    want = torch.from_numpy(data).float()[None] / 255
    want[:, 40:50, 40:50] = 1
    assert torch.equal(mask, want)
    assert torch.equal(hole_mask(64, 90, tmp_path / "m.png", keep_8bit=True), torch.from_numpy(data)[None])
    with pytest.raises(ValueError, match=r"mask .*m.png is 90 x 64 but image cat.png is 91 x 64"):
        hole_mask(64, 91, tmp_path / "m.png", image="cat.png")


def test_the_bundled_mask_removes_the_patch_and_the_badge():
    """``glcic-fast bench -o`` and scripts/make_object_removal_figure.py read this one file:
    the two boxes over the mission patch and the name badge (README's figure)."""
    mask = cv2.imread(EXAMPLE_MASK, cv2.IMREAD_UNCHANGED)
    assert torch.equal(torch.from_numpy(mask)[None], rect_mask(512, 512, [(130, 343, 84, 84), (276, 336, 56, 42)]))
