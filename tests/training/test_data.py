"""The training data: image listing, the paper's augmentation, the order of samples, the
mean pixel, masks and crops, free-form holes."""

import os

import cv2
import numpy as np
import pytest
import torch

from glcic_fast.training.data import (Augmentation, FreeFormMasks, ImageFolder, StepBatchSampler, compute_mean_pixel,
                                      crop_squares, draw_free_form, epoch_permutation, hole_mask, list_images)


def test_image_listing_is_recursive_and_sorted(photos):
    files = list_images(photos)
    assert files == sorted(files) and len(files) == 6
    assert {os.path.splitext(f)[1].lower() for f in files} == {".jpg", ".jpeg", ".png", ".webp"}
    assert "nested/deeper/rocket.JPG" in files and "notes.txt" not in files and ".hidden.jpg" not in files


def test_augmentation_geometry_and_determinism(photos):
    aug = Augmentation(32, 16, (8, 12))
    assert aug.scale_range == (32, 48) and Augmentation().scale_range == (256, 384)
    ds = ImageFolder(photos, aug, seed=5)
    seen_sizes = set()
    for epoch in range(3):
        for index in range(len(ds)):
            s = ds[(epoch, index)]
            assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.uint8
            y, x, h, w = s["hole"].tolist()
            seen_sizes.update((h, w))
            assert 8 <= h <= 12 and 8 <= w <= 12 and 0 <= y <= 32 - h and 0 <= x <= 32 - w
            fy, fx = s["local_fake"].tolist()
            ry, rx = s["local_real"].tolist()
            assert 0 <= fy <= 16 and 0 <= fx <= 16 and 0 <= ry <= 16 and 0 <= rx <= 16
            # Centred on the hole, clipped inside: the hole lies inside the patch here.
            assert fy <= y and y + h <= fy + 16 and fx <= x and x + w <= fx + 16
            cy, cx = y + h // 2, x + w // 2
            assert fy == min(max(cy - 8, 0), 16) and fx == min(max(cx - 8, 0), 16)
    assert seen_sizes <= set(range(8, 13)) and len(seen_sizes) > 2
    a, b = ds[(1, 2)], ImageFolder(photos, aug, seed=5)[(1, 2)]
    assert all(torch.equal(a[k], b[k]) for k in a)  # a function of (seed, epoch, index)
    c = ds[(2, 2)]
    assert not torch.equal(a["hole"], c["hole"]) or not torch.equal(a["image"], c["image"])


def test_sampler_shards_the_global_batch_and_covers_each_epoch():
    n, batch = 7, 4
    one = StepBatchSampler(n, batch, seed=1, end_step=7)
    halves = [StepBatchSampler(n, batch, seed=1, rank=r, world_size=2, end_step=7) for r in range(2)]
    stream = []
    for full, a, b in zip(one, *halves):
        assert full == a + b
        stream += full
    for epoch in range(4):  # 28 samples = 4 epochs of 7: each image once per epoch
        keys = stream[epoch * n:(epoch + 1) * n]
        assert {e for e, _ in keys} == {epoch}
        assert [i for _, i in keys] == epoch_permutation(n, 1, epoch).tolist()
    resumed = StepBatchSampler(n, batch, seed=1, start_step=3, end_step=7)
    assert list(resumed) == list(one)[3:]
    with pytest.raises(ValueError, match="multiple"):
        StepBatchSampler(n, 3, seed=1, world_size=2)


def test_mean_pixel_masks_and_crops(photos):
    ds = ImageFolder(photos, Augmentation(32, 16, (8, 12)))
    total, count = np.zeros(3), 0
    for f in ds.files:
        image = cv2.imread(os.path.join(photos, f), cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float64)
        total += image.reshape(-1, 3).sum(0)
        count += image.shape[0] * image.shape[1]
    np.testing.assert_allclose(compute_mean_pixel(ds), total / count / 255, rtol=1e-12)
    assert len(compute_mean_pixel(ds, max_images=2)) == 3
    mask = hole_mask(torch.tensor([[2, 3, 4, 5], [0, 0, 1, 1]]), 8)
    assert mask.shape == (2, 1, 8, 8) and mask[0].sum() == 20 and mask[0, 0, 2:6, 3:8].all() and mask[1, 0, 0, 0]
    images = torch.rand(2, 3, 8, 8)
    patches = crop_squares(images, torch.tensor([[1, 2], [4, 0]]), 4)
    assert torch.equal(patches[0], images[0, :, 1:5, 2:6]) and torch.equal(patches[1], images[1, :, 4:8, 0:4])


def test_unreadable_image_is_replaced_deterministically(photos, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(photos, root)
    (root / "aaa_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = ImageFolder(str(root), Augmentation(32, 16, (8, 12)))
    assert ds.files[0] == "aaa_broken.jpg"
    a, b = ds[(0, 0)], ds[(0, 0)]
    assert torch.equal(a["image"], b["image"])


# -- free-form holes -----------------------------------------------------------------------------

def _components(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask, connectivity=8)[0] - 1


def test_free_form_masks_cover_their_area_range_at_the_paper_size():
    """The defaults at 256 x 256: every mask binary, inside its documented area range,
    and the areas spread over that range (not piled up at one end)."""
    settings, size = FreeFormMasks(), 256
    lo, hi = settings.pixel_area(size)
    areas = []
    for i in range(300):
        mask = draw_free_form(size, settings, np.random.default_rng([9, i]))
        assert mask.shape == (size, size) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        areas.append(int(mask.sum()))
    assert lo <= min(areas) and max(areas) <= hi, (min(areas), max(areas), lo, hi)
    quarter = (hi - lo) / 4
    assert min(areas) < lo + quarter and max(areas) > hi - quarter, (min(areas), max(areas))
    assert np.median(areas) > lo + quarter / 2 and len(set(areas)) > 250


@pytest.mark.parametrize("settings, blobs_seen", [
    # Strokes only, one per mask: a stroke is one connected region.
    (FreeFormMasks(stroke_count=(1, 1), blob_count=(0, 0), area=(0.001, 0.99)), 0),
    # Blobs only, three per mask: at most three regions, and three where they do not touch.
    (FreeFormMasks(stroke_count=(0, 0), blob_count=(3, 3), blob_size=(0.03, 0.1), area=(0.001, 0.99)), 3),
    # Both, counts drawn from their ranges.
    (FreeFormMasks(stroke_count=(2, 4), blob_count=(0, 2), area=(0.001, 0.99)), None),
])
def test_free_form_counts_and_connectedness(settings, blobs_seen):
    """With an area range that never leaves a piece out nor adds one, a mask has at most
    as many connected regions as shapes drawn: each blob and each stroke is connected."""
    size, most = 64, settings.stroke_count[1] + settings.blob_count[1]
    counts = [_components(draw_free_form(size, settings, np.random.default_rng([4, i]))) for i in range(200)]
    assert 1 <= min(counts) and max(counts) <= most, (min(counts), max(counts))
    if settings.blob_count == (0, 0):
        assert set(counts) == {1}
    elif blobs_seen is not None:
        assert blobs_seen in counts  # the count is reached
    else:
        assert len(set(counts)) >= 3  # the counts vary with their ranges


@pytest.mark.parametrize("settings", [
    # One short stroke covers too little: strokes are added until the minimum.
    FreeFormMasks(stroke_count=(1, 1), stroke_vertices=(2, 2), blob_count=(0, 0), area=(0.25, 0.6)),
    # Three large blobs cover too much: those that would pass the maximum are left out.
    FreeFormMasks(stroke_count=(0, 1), blob_count=(3, 3), blob_size=(0.15, 0.2), area=(0.05, 0.2)),
])
def test_free_form_area_range_holds_where_the_shapes_alone_would_leave_it(settings):
    size = 64
    lo, hi = settings.pixel_area(size)
    areas = [int(draw_free_form(size, settings, np.random.default_rng([5, i])).sum()) for i in range(200)]
    assert lo <= min(areas) and max(areas) <= hi, (min(areas), max(areas), lo, hi)


def test_free_form_settings_are_checked():
    with pytest.raises(ValueError, match="widen the area range"):
        FreeFormMasks(area=(0.2, 0.22)).check(256)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        FreeFormMasks(area=(0.0, 0.5))
    with pytest.raises(ValueError, match="stroke_count"):
        FreeFormMasks(stroke_count=(3, 1))
    with pytest.raises(ValueError, match="holes must be one of"):
        Augmentation(32, 16, (8, 12), holes="circles")
    with pytest.raises(ValueError, match="free_probability"):
        Augmentation(32, 16, (8, 12), holes="mixed", free_probability=1.5)
    # The rectangles-only default does not need the free-form settings to fit.
    Augmentation(32, 16, (8, 12), free_form=FreeFormMasks(area=(0.2, 0.22)))
    with pytest.raises(ValueError, match="widen the area range"):
        Augmentation(32, 16, (8, 12), holes="free", free_form=FreeFormMasks(area=(0.2, 0.22)))


def _assert_same_sample(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_free_form_samples_are_deterministic_centred_and_vary_by_step(photos):
    """A free-form sample is a function of (seed, epoch, index) alone (the global random
    states do not matter); its local patch is centred on the mask's bounding box; the
    masks of different steps differ."""
    import random

    aug = Augmentation(32, 16, (8, 12), holes="free")
    ds = ImageFolder(photos, aug, seed=5)
    lo, hi = aug.free_form.pixel_area(32)
    first = ds[(1, 2)]
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _assert_same_sample(first, ImageFolder(photos, aug, seed=5)[(1, 2)])
    sampler = StepBatchSampler(len(ds), 4, seed=5, end_step=6)
    masks = []
    for keys in sampler:
        for key in keys:
            s = ds[key]
            mask = s["mask"]
            assert mask.shape == (1, 32, 32) and mask.dtype == torch.uint8
            assert lo <= int(mask.sum()) <= hi
            box = cv2.boundingRect(mask[0].numpy())  # x, y, w, h
            assert s["hole"].tolist() == [box[1], box[0], box[3], box[2]]
            y, x, h, w = s["hole"].tolist()
            assert s["local_fake"].tolist() == [min(max(y + h // 2 - 8, 0), 16), min(max(x + w // 2 - 8, 0), 16)]
            masks.append(mask.numpy().tobytes())
    assert len(set(masks)) == len(masks)  # 24 samples over 6 steps, all different
    assert "mask" not in ImageFolder(photos, Augmentation(32, 16, (8, 12)), seed=5)[(1, 2)]


def test_mixed_holes_are_rectangles_or_free_form_by_probability(photos):
    def kinds(p):
        ds = ImageFolder(photos, Augmentation(32, 16, (8, 12), holes="mixed", free_probability=p), seed=1)
        found = []
        for epoch in range(40):
            for index in range(len(ds)):
                s = ds[(epoch, index)]
                y, x, h, w = s["hole"].tolist()
                # A rectangle fills its box; a free-form hole never does (strokes and ellipses).
                is_rect = bool(s["mask"].sum() == h * w)
                if is_rect:
                    assert 8 <= h <= 12 and 8 <= w <= 12
                found.append(not is_rect)
        return found

    assert not any(kinds(0.0)) and all(kinds(1.0))
    free = kinds(0.3)
    n = len(free)
    sd = (0.3 * 0.7 / n) ** 0.5
    assert abs(sum(free) / n - 0.3) < 4 * sd, sum(free) / n
