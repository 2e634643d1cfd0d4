"""The training data: image listing, the paper's augmentation, the order of samples, the
mean pixel, masks and crops."""

import os

import cv2
import numpy as np
import pytest
import torch

from glcic_fast.training.data import (Augmentation, ImageFolder, StepBatchSampler, compute_mean_pixel, crop_squares,
                                      epoch_permutation, hole_mask, list_images)


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
