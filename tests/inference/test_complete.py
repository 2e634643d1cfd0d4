"""complete(): bad input gets a clear error; documented results for edge cases."""

import pytest
import torch

from glcic_fast import CompletionNet

from helpers import random_image_and_mask, randomize


@pytest.fixture(scope="module")
def net():
    return randomize(CompletionNet(), seed=0)


def test_empty_mask_returns_the_input_unchanged(net):
    image = torch.rand(3, 30, 34)
    out = net.complete(image, torch.zeros(1, 30, 34))
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()


def test_soft_mask_is_thresholded_at_half_by_default(net):
    image, mask = random_image_and_mask(1, 32, 32)
    soft = mask * 0.7 + (1 - mask) * 0.3  # 0.7 inside the hole, 0.3 outside
    assert torch.equal(net.complete(image, soft), net.complete(image, mask))
    # With a threshold above 0.7 nothing is a hole.
    assert torch.equal(net.complete(image, soft, mask_threshold=0.8), image)


def test_unbatched_and_batched_agree(net):
    image, mask = random_image_and_mask(2, 36, 28, seed=1)
    batched = net.complete(image, mask)
    assert torch.allclose(net.complete(image[1], mask[1]), batched[1], atol=1e-5)


@pytest.mark.parametrize("image, mask, error, match", [
    (torch.rand(1, 2, 32, 32), torch.zeros(1, 1, 32, 32), ValueError, "3 x H x W"),  # 1, 3, 4 are gray, RGB, RGBA
    (torch.rand(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), ValueError, "1 x H x W"),
    (torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 30), ValueError, "same N, H and W"),
    (torch.rand(2, 3, 32, 32), torch.zeros(1, 1, 32, 32), ValueError, "same N, H and W"),
    (torch.full((1, 3, 8, 8), float("nan")), torch.zeros(1, 1, 8, 8), ValueError, "NaN"),
    (torch.rand(1, 3, 8, 8) * 255, torch.zeros(1, 1, 8, 8), ValueError, r"\[0, 1\]"),
    (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), torch.zeros(1, 1, 8, 8), TypeError, "/ 255"),
    (torch.rand(1, 3, 8, 8), torch.full((1, 1, 8, 8), 2.0), ValueError, r"mask values must lie in \[0, 1\]"),
    ("image.png", torch.zeros(1, 1, 8, 8), TypeError, "torch.Tensor"),
    (torch.rand(3, 0, 5), torch.zeros(1, 0, 5), ValueError, r"image is 0 pixels high and 5 wide \(shape \(1, 3, 0, 5\)\): "
                                                            r"expected at least 1 x 1 pixels"),
    (torch.rand(2, 1, 7, 0), torch.zeros(2, 1, 7, 0), ValueError, "image is 7 pixels high and 0 wide"),
    (torch.rand(3, 4, 5), torch.zeros(1, 0, 0), ValueError, "mask is 0 pixels high and 0 wide"),
])
def test_bad_input(net, image, mask, error, match):
    with pytest.raises(error, match=match):
        net.complete(image, mask)


def test_wrong_device(net):
    image, mask = random_image_and_mask(1, 8, 8)
    with pytest.raises(ValueError, match="net's device"):
        net.complete(image.to("meta"), mask.to("meta"))


def test_a_batch_of_no_images_gives_no_images(net):
    image = torch.rand(0, 3, 8, 8)
    out = net.complete(image, torch.zeros(0, 1, 8, 8))
    assert out.shape == image.shape
