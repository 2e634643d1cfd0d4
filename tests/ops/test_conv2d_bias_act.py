"""glcic_fast.ops.conv2d_bias_act and conv_transpose2d_bias_act."""

import subprocess

import pytest
import torch

from glcic_fast import ops

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------- int64 offsets

def _sparse_channels_last(path, c, h, w, dtype):
    """A 1 x c x h x w channels_last tensor over a sparse file: its size costs neither
    memory nor disk, only the pages written to hold data."""
    numel = c * h * w
    subprocess.run(["truncate", "-s", str(numel * torch.finfo(dtype).bits // 8), str(path)], check=True)
    flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    return flat.view(1, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("c_in", [1, 32], ids=["flat-K", "per-tap-K"])
def test_triton_one_image_of_more_than_2_31_pixels(tmp_path, device, c_in):
    """One image of 65537 x 65537 pixels, a 1x1 conv of stride 65536: the 2 x 2 output reads
    pixels (0, 0), (0, S), (S, 0) and (S, S), S = 65536. Pixel (S, 0) is S * 65537 = 2^32 + S
    from the image's start: computed in int32, its row offset wraps to S (and (S, S)'s to
    2S), so the kernel would read pixel (0, S) (and a zero) in their place, within the image
    rather than outside it. With 1 input channel the K loop is the flat one, with 32 (a
    multiple of the interpreter's BLOCK_K) the per-tap one; on a GPU only the former fits."""
    s = 65536
    side = s + 1
    dtype = torch.float32 if c_in == 1 else torch.float16
    if device == "cuda":
        if c_in != 1:
            pytest.skip(f"1 x {c_in} x {side} x {side} would not fit in GPU memory")
        if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
            pytest.skip("needs a GPU with at least 24 GiB")
        x = torch.zeros(1, c_in, side, side, dtype=dtype, device=device)
    else:
        x = _sparse_channels_last(tmp_path / "x.bin", c_in, side, side, dtype)
    w = torch.ones(1, c_in, 1, 1, dtype=dtype, device=device)
    bias = torch.full((1,), 0.5, dtype=dtype, device=device)
    reason = ops.explain("conv2d_bias_act", x.device, x, w, bias, s, 0, 1, "none", None, None, backend="triton")[1]
    if reason:
        pytest.skip("; ".join(reason))
    values = {(0, 0): 1.0, (0, s): 2.0, (s, 0): 3.0, (s, s): 4.0}
    for (i, j), v in values.items():
        x[0, :, i, j] = v
    assert x.is_contiguous(memory_format=torch.channels_last)  # the launcher reads it in place
    with torch.no_grad():
        y = ops.conv2d_bias_act(x, w, bias, stride=s, activation="none", backend="triton")
    # Each output is the sum over the channels of the one pixel it reads, plus the bias.
    expected = torch.tensor([[c_in * v + 0.5 for (i, j), v in values.items() if i == row] for row in (0, s)])
    assert y.shape == (1, 1, 2, 2)
    assert torch.equal(y[0, 0].cpu().float(), expected), y[0, 0].tolist()
