"""The demo's quality comparison: PSNR inside the holes, random holes, the Telea baseline."""

import math

import pytest
import torch

import glcic_fast
from glcic_fast.inference import quality

from helpers import randomize
from photos import photo


def test_psnr_counts_only_the_hole():
    truth = photo("coffee", 40, 60)
    hole = torch.zeros(1, 40, 60)
    hole[:, 10:20, 5:25] = 1
    result = truth.clone()
    result[:, 10:20, 5:25] += 0.1  # MSE 0.01 inside: 20 dB
    result[:, 30:, :] = 0  # outside the hole: not scored
    assert quality.psnr_in_holes(result, truth, hole) == pytest.approx(20.0, abs=1e-4)
    assert quality.psnr_in_holes(truth, truth, hole) == math.inf
    with pytest.raises(ValueError, match="empty"):
        quality.psnr_in_holes(result, truth, torch.zeros(1, 40, 60))


def test_random_holes_are_seeded_and_in_range():
    draw = lambda seed: quality.random_hole(100, 70, (20, 80), torch.Generator().manual_seed(seed))
    assert draw(3) == draw(3) and draw(3) != draw(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        y, x, h, w = quality.random_hole(100, 70, (20, 80), g)
        assert 20 <= h <= 80 and 20 <= w <= 70  # a side longer than the image is clipped to it
        assert 0 <= y and y + h <= 100 and 0 <= x and x + w <= 70


def test_telea_fills_only_the_hole_and_beats_a_flat_fill():
    truth = photo("chelsea", 64, 96)
    hole = torch.zeros(1, 64, 96)
    hole[:, 20:36, 30:50] = 1
    filled = quality.telea(truth, hole)
    outside = ~hole.bool().expand_as(truth)
    assert torch.equal(filled[outside], truth[outside])
    flat = torch.where(hole.bool(), torch.full_like(truth, 0.5), truth)
    assert quality.psnr_in_holes(filled, truth, hole) > quality.psnr_in_holes(flat, truth, hole)


def test_compare_scores_every_method_on_every_photo():
    net = randomize(glcic_fast.CompletionNet(), seed=1).eval()
    photos = {"coffee": photo("coffee", 48, 64), "rocket": photo("rocket", 64, 48)}
    scores = quality.compare(net, photos, holes_per_photo=2, hole_range=(12, 20), seed=5)
    assert [(s.photo, s.method) for s in scores] == [(p, m) for p in photos for m in quality.METHODS]
    assert all(s.holes == 2 and math.isfinite(s.psnr) for s in scores)
    again = quality.compare(net, photos, holes_per_photo=2, hole_range=(12, 20), seed=5)
    assert again == scores  # seeded: the same holes, the same numbers
    table = quality.markdown_table(scores)
    assert table.count("\n") == 4 and "| coffee | 2 |" in table and "**mean**" in table
    assert "OpenCV Telea (dB)" in table
