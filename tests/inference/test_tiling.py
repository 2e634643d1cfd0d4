"""Tiled inference: bit-identical (fp32) to the whole-image forward everywhere; tile
geometry; the max_pixels rule; the automatic retry on CUDA out-of-memory errors.

As in test_roi.py, the bit-identity tests switch oneDNN off (it blocks its convolutions
differently per shape, which moves the last bits); see there.
"""

import pytest
import torch

from glcic_fast import CompletionNet
from glcic_fast.inference import completion
from glcic_fast.inference import tiling
from glcic_fast.inference.completion import complete_with
from glcic_fast.inference.roi import HALO, Box

from helpers import randomize
from photos import photo, rect_mask


@pytest.fixture(scope="module")
def net():
    return randomize(CompletionNet(), seed=1).eval()


def _network_output(net, image, mask, **kw):
    with torch.inference_mode():
        return completion.network_output(net, image[None], (mask[None] > 0.5).float(), **kw)


def test_tiled_network_output_equals_whole_image_everywhere(net, shape_invariant_convs):
    # 262 x 333: not multiples of 4 (replicate padding), 2 x 2 tiles of ~132 x 168 cores.
    image = photo("chelsea", 262, 333)
    mask = rect_mask(262, 333, (100, 120, 60, 70))
    whole = _network_output(net, image, mask, roi=False)
    tiled = _network_output(net, image, mask, roi=False, tile=200)
    assert torch.equal(tiled, whole)  # every pixel, not only the hole's


def test_tiled_roi_equals_whole_image(net, shape_invariant_convs):
    image = photo("astronaut", 300, 451)
    mask = rect_mask(300, 451, (130, 200, 30, 37))
    whole = complete_with(net, image, mask, roi=False)
    tiled = complete_with(net, image, mask, roi=True, tile=20)  # 2 x 2 cores inside the hole's crop
    assert torch.equal(tiled, whole)
    outside = (mask <= 0.5).expand_as(image)
    assert torch.equal(tiled[outside], image[outside])


def test_cores_cover_the_target_once_on_multiples_of_4():
    target = Box(5, 1003, 7, 650)
    cores = list(tiling.cores(target, 256))
    covered = torch.zeros(1010, 660, dtype=torch.int32)
    for c in cores:
        assert c.y1 - c.y0 <= 256 and c.x1 - c.x0 <= 256
        covered[c.y0:c.y1, c.x0:c.x1] += 1
        assert c.y0 == target.y0 or c.y0 % 4 == 0
        assert c.x0 == target.x0 or c.x0 % 4 == 0
    assert covered[5:1003, 7:650].eq(1).all() and covered.sum() == 998 * 643
    assert len(cores) == 4 * 3  # as few as possible per axis
    for core, tile in tiling.tiles(target, 256, 1004, 652):
        assert all(v % 4 == 0 for v in (tile.y0, tile.y1, tile.x0, tile.x1))
        assert tile.y0 <= core.y0 - HALO or tile.y0 == 0
        assert tile.y1 >= core.y1 + HALO or tile.y1 == 1004


def test_max_pixels_picks_the_largest_fitting_core():
    assert tiling.core_for_max_pixels(1024 * 1024) == 1024 - 2 * HALO
    assert (tiling.core_for_max_pixels(10 ** 6) + 2 * HALO) ** 2 <= 10 ** 6
    with pytest.raises(ValueError, match="too small for exact tiling"):
        tiling.core_for_max_pixels(300 * 300)
    with pytest.raises(ValueError, match="tile must be an int"):
        complete_with(CompletionNet(), torch.rand(3, 8, 8), torch.ones(1, 8, 8), tile=2)


def _pointwise_forward(calls, oom_above=None):
    """A stand-in for the network: pointwise (so trivially exact under any tiling),
    recording the input sizes, raising CUDA out-of-memory for inputs over a size."""

    def forward(net, x):
        calls.append(tuple(x.shape[-2:]))
        if oom_above is not None and x.shape[-2] * x.shape[-1] > oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.sigmoid(x[:, :3] * 2 + x[:, 3:])

    return forward


def test_max_pixels_tiles_only_larger_crops(monkeypatch):
    calls = []
    monkeypatch.setattr(completion, "run_network", _pointwise_forward(calls))
    net = CompletionNet()
    image, mask = torch.rand(3, 700, 900), rect_mask(700, 900, (300, 400, 100, 100))
    whole = complete_with(net, image, mask, roi=False)
    calls.clear()
    assert torch.equal(complete_with(net, image, mask, roi=False, max_pixels=400 * 400), whole)
    assert len(calls) > 1 and all(h * w <= 400 * 400 for h, w in calls)
    calls.clear()
    complete_with(net, image, mask, roi=False, max_pixels=1000 * 1000)
    assert calls == [(700, 900)]


def test_out_of_memory_retries_in_smaller_tiles(monkeypatch):
    calls, emptied = [], []
    monkeypatch.setattr(tiling, "empty_cuda_cache", lambda: emptied.append(1))
    monkeypatch.setattr(completion, "run_network", _pointwise_forward(calls))
    net = CompletionNet()
    image, mask = torch.rand(3, 1200, 1000), rect_mask(1200, 1000, (100, 100, 900, 700))
    want = complete_with(net, image, mask)
    monkeypatch.setattr(completion, "run_network", _pointwise_forward(calls, oom_above=500 * 500))
    calls.clear()
    got = complete_with(net, image, mask)
    assert torch.equal(got, want)
    assert calls[0] == (1200, 1000)  # the whole image first, then tiles that fit
    assert emptied and all(h * w <= 500 * 500 for h, w in calls[-4:])


def test_out_of_memory_with_nothing_small_enough_reraises(monkeypatch):
    monkeypatch.setattr(tiling, "empty_cuda_cache", lambda: None)
    monkeypatch.setattr(completion, "run_network", _pointwise_forward([], oom_above=100))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        complete_with(CompletionNet(), torch.rand(3, 600, 600), rect_mask(600, 600, (200, 200, 200, 200)))


def test_first_that_fits_tries_each_attempt_in_turn(monkeypatch):
    emptied = []
    monkeypatch.setattr(tiling, "empty_cuda_cache", lambda: emptied.append(1))

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def other():
        raise ValueError("other")

    assert tiling.first_that_fits([lambda: 1, oom]) == 1 and not emptied
    assert tiling.first_that_fits([oom, oom, lambda: 3]) == 3 and len(emptied) == 2
    tried = []
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tiling.first_that_fits(lambda i=i: tried.append(i) or oom() for i in range(3))
    assert tried == [0, 1, 2]
    with pytest.raises(ValueError, match="other"):  # anything else is not retried
        tiling.first_that_fits([other, lambda: 2])
