"""glcic_fast.ops.masked_mse, forward + backward, each backend vs the eager composition.

The eager composition is what a training script writes without glcic_fast:
``((mask * (pred - target)) ** 2).sum() / mask.expand_as(pred).sum()`` and autograd.
Each group is one shape and dtype; its rows are measured side by side in one run.

* CUDA (skipped without a GPU): 96 x 3 x 256 x 256 (the paper's batch) and
  8 x 3 x 2048 x 2048, fp32 and bf16; backends "cuda", "triton", "torch" and eager.
  extra_info["GB/s"] is the traffic the fused op cannot avoid (read pred, target and mask,
  write the gradient; backward reads it and writes the scaled one) over the median time.
* CPU: 8 x 3 x 256 x 256 fp32; backends "cpp" and "torch" and eager.

Run `pytest benchmarks/bench_masked_mse.py --benchmark-only`.
"""

import pytest
import torch
from measure import provenance, synchronized

from glcic_fast import ops

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_ROWS = ("eager",) + ops.BACKENDS


def _eager(pred, target, mask):
    return ((mask * (pred - target)) ** 2).sum() / mask.expand_as(pred).sum()


def _inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    pred = torch.rand(shape, generator=g, device=device, dtype=dtype).requires_grad_(True)
    target = torch.rand(shape, generator=g, device=device, dtype=dtype)
    n, _, h, w = shape
    mask = torch.zeros(n, 1, h, w, device=device, dtype=dtype)
    # One hole per image, a quarter of each side at least, as in the paper's training.
    mask[:, :, h // 4: h // 4 + h * 3 // 8, w // 3: w // 3 + w * 3 // 8] = 1
    return pred, target, mask


def _run(benchmark, row, shape, dtype, device):
    pred, target, mask = _inputs(shape, dtype, device)
    if row == "eager":
        loss_of = _eager
    else:
        chosen, skipped = ops.explain("masked_mse", pred.device, pred, target, mask, True, backend=row)
        if chosen is None:
            pytest.skip("; ".join(skipped))

        def loss_of(p, t, m):
            return ops.masked_mse(p, t, m, backend=row)

    def step():
        pred.grad = None
        loss = loss_of(pred, target, mask)
        loss.backward()
        return loss

    loss = benchmark(synchronized(step))
    with torch.no_grad():
        want = _eager(pred.double(), target.double(), mask.double())
    fused_bytes = pred.numel() * pred.element_size() * 5 + mask.numel() * mask.element_size()
    benchmark.extra_info.update(provenance())
    benchmark.extra_info.update({
        "threads": torch.get_num_threads(), "shape": list(shape), "dtype": str(dtype).split(".")[-1], "row": row,
        "fused_bytes": fused_bytes, "loss_rel_error_to_float64": abs(loss.item() - want.item()) / want.item(),
    })
    if not benchmark.disabled:
        benchmark.extra_info["GB/s"] = fused_bytes / benchmark.stats.stats.median / 1e9


@_CUDA
@pytest.mark.parametrize("row", [r for r in _ROWS if r != "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(96, 3, 256, 256), (8, 3, 2048, 2048)], ids=lambda s: "x".join(map(str, s)))
def test_cuda(benchmark, row, dtype, shape):
    benchmark.group = f"masked-mse-cuda-{'x'.join(map(str, shape))}-{str(dtype).split('.')[-1]}"
    _run(benchmark, row, shape, dtype, "cuda")


@pytest.mark.parametrize("row", ["eager", "torch", "cpp"])
def test_cpu(benchmark, row):
    benchmark.group = "masked-mse-cpu-8x3x256x256-float32"
    _run(benchmark, row, (8, 3, 256, 256), torch.float32, "cpu")
