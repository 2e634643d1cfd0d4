"""glcic_fast.complete: weights from a path, the environment, or explicitly random;
tensors, numpy arrays and paths in, the same kind out."""

import os

import cv2
import numpy as np
import pytest
import torch

import glcic_fast
from glcic_fast.devices import parse_dtype
from glcic_fast.inference.api import NoWeightsError, get_net
from glcic_fast.inference.completion import complete_with

from helpers import randomize
from photos import photo, rect_mask


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    net = randomize(glcic_fast.CompletionNet(), seed=5).eval()
    path = tmp_path_factory.mktemp("w") / "net.safetensors"
    glcic_fast.save(net, path)
    return net, str(path)


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv("GLCIC_FAST_WEIGHTS", raising=False)


def test_tensor_in_tensor_out(saved):
    net, path = saved
    image, mask = photo("chelsea", 60, 70), rect_mask(60, 70, (10, 10, 20, 20))
    out = glcic_fast.complete(image, mask, weights=path, device="cpu")
    assert torch.equal(out, complete_with(net, image, mask))
    assert get_net(path, "cpu") is get_net(path, "cpu")  # loaded once


def test_numpy_and_paths(saved, tmp_path):
    net, path = saved
    rgb = (photo("coffee", 48, 64).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:40] = True
    out = glcic_fast.complete(rgb, mask, weights=path, device="cpu")
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.array_equal(out[~mask], rgb[~mask])
    cv2.imwrite(str(tmp_path / "i.png"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "m.png"), mask.astype(np.uint8) * 255)
    from_files = glcic_fast.complete(tmp_path / "i.png", tmp_path / "m.png", weights=path, device="cpu")
    assert np.array_equal((from_files.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), out)
    gray = glcic_fast.complete(rgb[..., 0], mask, weights=path, device="cpu")
    assert gray.shape == (48, 64) and np.array_equal(gray[~mask], rgb[..., 0][~mask])


def test_weights_must_be_given(saved, monkeypatch):
    _, path = saved
    image, mask = photo("chelsea", 32, 32), rect_mask(32, 32, (8, 8, 8, 8))
    with pytest.raises(NoWeightsError, match="GLCIC_FAST_WEIGHTS"):
        glcic_fast.complete(image, mask)
    monkeypatch.setenv("GLCIC_FAST_WEIGHTS", path)
    assert glcic_fast.complete(image, mask, device="cpu").shape == image.shape
    with pytest.warns(RuntimeWarning, match="randomly initialised"):
        glcic_fast.complete(image, mask, weights="random", device="cpu")


def test_dtype(saved):
    net, path = saved
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        parse_dtype("int8")
    image, mask = photo("chelsea", 32, 48), rect_mask(32, 48, (8, 8, 16, 16))
    out = glcic_fast.complete(image, mask, weights=path, device="cpu", dtype="bfloat16")
    assert out.dtype == torch.float32
    assert (out - complete_with(net, image, mask)).abs().max().item() < 0.1
    assert next(get_net(path, "cpu", "bfloat16").parameters()).dtype == torch.bfloat16


def test_an_image_without_pixels_is_a_clear_error(saved):
    _, path = saved
    for rgb, mask in [(np.zeros((0, 5, 3), np.uint8), np.zeros((0, 5), bool)),
                      (np.zeros((4, 0), np.float32), np.ones((4, 0), np.float32))]:
        with pytest.raises(ValueError, match=r"image is \d+ pixels high and \d+ wide .*expected at least 1 x 1"):
            glcic_fast.complete(rgb, mask, weights=path, device="cpu")
    with pytest.raises(ValueError, match="image is 0 pixels high and 6 wide"):
        glcic_fast.complete(torch.rand(3, 0, 6), torch.zeros(1, 0, 6), weights=path, device="cpu")
