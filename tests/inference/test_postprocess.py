"""Post-processing (Telea, then Poisson blending per hole region), gray and RGBA inputs."""

import cv2
import numpy as np
import pytest
import torch

from glcic_fast import CompletionNet
from glcic_fast.inference.completion import complete_with
from glcic_fast.inference.postprocess import blend, clone_holes, postprocess, to_uint8

from helpers import randomize
from photos import photo, rect_mask

H, W = 200, 260
HOLES = {
    "interior": [(100, 100, 30, 30)],
    "corner": [(0, 0, 40, 40)],
    "bottom-right": [(150, 230, 50, 30)],
    "full height at the left": [(0, 0, H, 30)],
    "several": [(100, 100, 30, 30), (20, 150, 10, 60), (190, 0, 10, W)],
    "thin strokes": [(50, 50, 2, 2), (80, 80, 1, 9), (120, 0, 2, 40)],
    "everything": [(0, 0, H, W)],
}


@pytest.fixture(scope="module")
def bgr():
    return to_uint8(photo("chelsea", H, W))


def _mask(name):
    return rect_mask(H, W, *HOLES[name])[0].numpy() > 0


def test_empty_mask_returns_the_input(bgr):
    empty = np.zeros((H, W), bool)
    out = blend(bgr, empty)
    assert np.array_equal(out, bgr) and out is not bgr
    image = photo("chelsea", H, W)
    assert torch.equal(postprocess(image, torch.zeros(1, H, W)), image)


@pytest.mark.parametrize("holes", list(HOLES))
def test_blend_does_not_throw_and_leaves_the_outside_alone(bgr, holes):
    mask = _mask(holes)
    out = blend(bgr, mask)
    assert out.shape == bgr.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], bgr[~mask])


@pytest.mark.parametrize("holes", [h for h in HOLES if h != "everything"])
def test_regions_are_cloned_in_place_also_at_the_border(bgr, holes):
    """Cloning an image into itself changes nothing (up to 8-bit rounding) only if each
    region lands where it came from and the border handling is consistent."""
    mask = _mask(holes)
    out = clone_holes(bgr, bgr.copy(), mask)
    assert np.abs(out.astype(int) - bgr).max() <= 1


@pytest.mark.parametrize("holes", ["interior", "corner", "bottom-right", "full height at the left", "several"])
def test_blend_carries_the_completion_into_the_telea_fill(bgr, holes):
    """With the true photo as the 'completion', the blend comes much closer to it inside
    the holes than the Telea fill it starts from."""
    mask = _mask(holes)
    telea = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, 1, cv2.INPAINT_TELEA)
    err = lambda a: np.abs(a.astype(float) - bgr)[mask].mean()
    assert err(blend(bgr, mask)) < 0.75 * err(telea)


@pytest.fixture(scope="module")
def net():
    return randomize(CompletionNet(), seed=2).eval()


def test_complete_with_postprocess_changes_only_the_holes(net):
    image = photo("astronaut", 96, 130)
    mask = rect_mask(96, 130, (0, 0, 20, 30), (40, 60, 20, 20), (80, 100, 16, 30))
    plain = complete_with(net, image, mask)
    post = complete_with(net, image, mask, postprocess=True)
    outside = (mask <= 0.5).expand_as(image)
    assert torch.equal(post[outside], image[outside]) and torch.equal(plain[outside], image[outside])
    inside = ~outside
    assert torch.equal(post[inside] * 255, (post[inside] * 255).round())  # 8-bit in the holes
    assert not torch.equal(post, plain)
    assert torch.equal(complete_with(net, image, torch.zeros(1, 96, 130), postprocess=True), image)


@pytest.mark.parametrize("postprocessed", [False, True])
def test_gray_input_gives_gray_output(net, postprocessed):
    rgb = photo("coffee", 64, 90)
    gray = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    mask = rect_mask(64, 90, (20, 30, 20, 25), (0, 70, 10, 20))
    out = complete_with(net, gray, mask, postprocess=postprocessed)
    assert out.shape == (1, 64, 90) and out.dtype == gray.dtype
    outside = mask <= 0.5
    assert torch.equal(out[outside], gray[outside])
    assert out.min() >= 0 and out.max() <= 1
    # The network saw the gray image repeated to RGB: the result is the luma of that.
    rgb_out = complete_with(net, gray.expand(3, -1, -1).contiguous(), mask, postprocess=postprocessed)
    luma = (rgb_out * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    assert torch.allclose(out, torch.where(mask > 0.5, luma, gray), atol=1e-6)


@pytest.mark.parametrize("postprocessed", [False, True])
def test_rgba_input_keeps_alpha(net, postprocessed):
    rgb = photo("chelsea", 64, 90)
    alpha = torch.linspace(0, 1, 90).expand(1, 64, 90).contiguous()
    rgba = torch.cat([rgb, alpha])
    mask = rect_mask(64, 90, (20, 30, 20, 25))
    out = complete_with(net, rgba, mask, postprocess=postprocessed)
    assert out.shape == (4, 64, 90)
    assert torch.equal(out[3:], alpha)
    assert torch.equal(out[:3], complete_with(net, rgb, mask, postprocess=postprocessed))


def test_batched_postprocess_handles_each_image(net):
    images = torch.stack([photo("chelsea", 64, 90), photo("coffee", 64, 90)])
    masks = torch.stack([rect_mask(64, 90, (10, 10, 20, 20)), torch.zeros(1, 64, 90)])
    out = complete_with(net, images, masks, postprocess=True)
    assert torch.equal(out[1], images[1])
    single = complete_with(net, images[0], masks[0], postprocess=True)
    assert torch.allclose(out[0], single, atol=1 / 255 + 1e-6)  # batched convolutions may round differently
