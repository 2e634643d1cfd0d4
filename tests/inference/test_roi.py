"""Region-of-interest inference: the receptive-field radius, the crop plan, and hole pixels
bit-identical (fp32) to the whole-image forward on real photographs.

Bit-identity needs convolutions whose arithmetic per output pixel does not depend on the
tensor's size. oneDNN (PyTorch's default CPU convolution) picks its blocking per shape,
and the CPU Winograd kernel computes a pixel from the tile it falls in, which moves the
last bits (about 1e-7): the exactness tests run with both switched off (PyTorch's own
convolutions), which isolates what this package controls (the crop
geometry, the halo, the alignment, the padding); one test checks the default
configuration to within rounding.
"""

import pytest
import torch

from glcic_fast import CompletionNet, ops
from glcic_fast.inference import roi
from glcic_fast.inference import completion
from glcic_fast.inference.completion import complete_with
from glcic_fast.inference.roi import HALO, RADIUS, Box

from helpers import randomize
from photos import photo, rect_mask


@pytest.fixture(scope="module")
def net():
    return randomize(CompletionNet(), seed=0).eval()


# -- the radius -------------------------------------------------------------------------

def test_radius_is_derived_from_the_layer_table():
    # 5x5 conv: 2 px; at 1/2: 1 + 1 (x2 px); at 1/4: 1 + 1 + 1 + 2 + 4 + 8 + 16 + 1 + 1
    # (x4 px); the deconvs and the full-resolution convs after them; the maximum over the
    # four phases of the stride-4 grid is 153 px, within SPEC.md's "about 156".
    assert RADIUS == 153
    assert HALO == 156 and HALO % 4 == 0
    reach = [roi.dependency_interval(p) for p in range(4)]
    assert max(p - lo for p, (lo, _) in enumerate(reach)) == 153
    assert max(hi - p for p, (_, hi) in enumerate(reach)) == 150
    # Shifting the output by the total stride shifts the interval by the same amount.
    assert roi.dependency_interval(6) == tuple(v + 4 for v in roi.dependency_interval(2))


def test_radius_holds_empirically(net, shape_invariant_convs):
    """Perturbing the input exactly at the edge of an output pixel's dependency interval
    changes that pixel; one pixel further out does not. Checked for every phase and both
    sides, on a thin strip (the argument is one-dimensional). With convolutions that
    compute each pixel from its own taps only: Winograd's rounding also mixes in the rest of
    a tile's patch, by about 1e-7 (test_roi_matches_whole_image_with_default_convolutions)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 4, 8, 480, generator=g)
    with torch.inference_mode():
        base = net(x)
        for p in range(200, 204):  # all four phases, far from the strip's ends
            lo, hi = roi.dependency_interval(p)
            for inside, outside in ((lo, lo - 1), (hi, hi + 1)):
                for column, should_change in ((inside, True), (outside, False)):
                    y = x.clone()
                    y[..., column] += 3.0
                    changed = not torch.equal(net(y)[..., p], base[..., p])
                    assert changed == should_change, (p, column, should_change)


# -- the plan ---------------------------------------------------------------------------

def test_plan_snaps_crops_to_multiples_of_4_and_stops_at_the_border():
    mask = rect_mask(601, 803, (300, 400, 21, 30), (0, 790, 10, 13))
    regions = roi.plan(mask[0])
    assert len(regions) == 2
    for r in regions:
        c = r.crop
        assert all(v % 4 == 0 for v in (c.y0, c.y1, c.x0, c.x1))
        assert 0 <= c.y0 and c.y1 <= 604 and 0 <= c.x0 and c.x1 <= 804
        t = r.target
        for near, far in ((t.y0 - c.y0, c.y0), (t.x0 - c.x0, c.x0), (c.y1 - t.y1, 604 - c.y1), (c.x1 - t.x1, 804 - c.x1)):
            assert near >= RADIUS or far == 0  # a full halo, unless the crop stops at the border
    corner = [r for r in regions if r.target.x1 == 803][0]
    assert corner.crop.y0 == 0 and corner.crop.x1 == 804


def test_plan_merges_nearby_holes_and_keeps_far_ones_apart():
    near = roi.plan(rect_mask(1200, 1200, (500, 500, 20, 20), (500, 560, 20, 20))[0])
    assert len(near) == 1 and near[0].target == Box(500, 520, 500, 580)
    far = roi.plan(rect_mask(1200, 1200, (100, 100, 20, 20), (1000, 1000, 20, 20))[0])
    assert len(far) == 2
    assert roi.crop_area(far) < 0.5 * 1200 * 1200 and roi.worthwhile(far, 1200, 1200)
    big = roi.plan(rect_mask(400, 400, (100, 100, 200, 200))[0])
    assert not roi.worthwhile(big, 400, 400)  # the crop is the whole image


def test_automatic_rule_and_keyword(net, monkeypatch):
    """roi=None takes crops only when they cover at most half the image; roi=True always,
    roi=False never. Checked with a stand-in forward that records the crops' shapes."""
    shapes = []

    def fake(net_, x):
        shapes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 3, *x.shape[-2:])

    monkeypatch.setattr(completion, "run_network", fake)
    image = torch.rand(3, 1000, 1000)
    small = rect_mask(1000, 1000, (480, 480, 30, 30))
    for kw, want in (({}, [(344, 344)]), ({"roi": True}, [(344, 344)]), ({"roi": False}, [(1000, 1000)])):
        shapes.clear()
        complete_with(net, image, small, **kw)
        assert shapes == want, kw
    shapes.clear()
    complete_with(net, image, rect_mask(1000, 1000, (200, 200, 500, 500)))
    assert shapes == [(1000, 1000)]
    with pytest.raises(ValueError, match="roi must be"):
        complete_with(net, image, small, roi="yes")


# -- exactness on photographs -------------------------------------------------------------

def _check_roi_equals_whole(net, image, mask, min_regions, atol=0.0):
    n_regions = len(roi.plan(mask.reshape(-1, *mask.shape[-2:]).amax(0)))
    assert n_regions >= min_regions  # the test exercises what it says it does
    whole = complete_with(net, image, mask, roi=False)
    cropped = complete_with(net, image, mask, roi=True)
    if atol == 0:
        assert torch.equal(cropped, whole)
    else:
        assert (cropped - whole).abs().max().item() <= atol
    outside = (mask <= 0.5).expand_as(image)
    assert torch.equal(whole[outside], image[outside])  # only the holes are replaced
    return whole


def test_roi_equals_whole_image_odd_size_border_and_separate_holes(net, shape_invariant_convs):
    # 510 x 509: neither a multiple of 4, so the whole-image path pads with replicate.
    image = photo("astronaut", 510, 509)
    mask = rect_mask(510, 509,
                     (480, 470, 40, 40),   # touches the bottom-right corner (the padding)
                     (20, 30, 25, 18),     # near the top-left border
                     (40, 80, 20, 20))     # close to the previous one: shares its crop
    _check_roi_equals_whole(net, image, mask, min_regions=2)


def test_roi_equals_whole_image_holes_far_apart(net, shape_invariant_convs):
    # Two holes far apart, each crop with an interior edge.
    image = photo("coffee", 300, 822)
    mask = rect_mask(300, 822, (140, 160, 17, 23), (130, 640, 30, 9))
    regions = roi.plan(mask[0])
    assert len(regions) == 2 and all(0 < r.crop.x0 or r.crop.x1 < 824 for r in regions)
    _check_roi_equals_whole(net, image, mask, min_regions=2)


def test_roi_matches_whole_image_with_default_convolutions(net):
    """With oneDNN the crops' convolutions may be blocked differently, and the Winograd
    kernel's tiles fall differently on a crop: the same values to within fp32 rounding."""
    image = photo("coffee", 300, 822)
    mask = rect_mask(300, 822, (140, 160, 17, 23), (130, 640, 30, 9))
    _check_roi_equals_whole(net, image, mask, min_regions=2, atol=1e-5)


def test_roi_equals_whole_image_batch_with_different_holes(net, shape_invariant_convs):
    image = torch.stack([photo("chelsea", 300, 451), photo("coffee", 300, 451)])
    mask = torch.stack([rect_mask(300, 451, (10, 10, 20, 20)), rect_mask(300, 451, (250, 400, 30, 30))])
    _check_roi_equals_whole(net, image, mask, min_regions=2)


def test_sigmoid_output_does_not_depend_on_the_crop():
    """The torch backend's sigmoid gives an element the same bits wherever it lies in the
    tensor (PyTorch's CPU sigmoid alone does not: its vector and scalar loops differ in
    the last bit), so a crop's output pixels equal the whole tensor's."""
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 97, 131) * 4).contiguous(memory_format=torch.channels_last)
    identity = torch.eye(3).view(3, 3, 1, 1)  # a 1 x 1 conv that copies its input exactly
    with torch.inference_mode():
        whole = ops.conv2d_bias_act(x, identity, None, activation="sigmoid", backend="torch")
        assert (whole - torch.sigmoid(x.double())).abs().max().item() < 1e-6
        for top, left, h, w in ((0, 0, 97, 130), (1, 3, 40, 77), (50, 7, 47, 124), (13, 0, 5, 131)):
            crop = x[:, :, top:top + h, left:left + w]
            got = ops.conv2d_bias_act(crop, identity, None, activation="sigmoid", backend="torch")
            assert torch.equal(got, whole[:, :, top:top + h, left:left + w]), (top, left, h, w)