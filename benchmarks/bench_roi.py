"""Region-of-interest inference vs the whole image, and folder throughput.

One 128 x 128 hole in the middle of an S x S image, completed with ``roi=False`` (the
whole image through the network) and ``roi=True`` (one crop of the hole plus the
receptive-field halo, 440 x 440 here). S is ``GLCIC_FAST_BENCH_ROI_SIZE``: by default
4096 on a GPU (target: ROI at least 50x faster) and 1024 on the CPU, where the
whole-image forward of a 4096 image is 16 TFLOP (minutes); the ratio grows with S^2 / 440^2.

    pytest benchmarks/bench_roi.py --benchmark-only        # the two rows of group roi-S
    GLCIC_FAST_BENCH_ROI_SIZE=2048 pytest benchmarks/bench_roi.py --benchmark-only

The ROI row's extra_info holds ``speedup_vs_whole`` (mean whole / mean ROI) when both ran
in the same session. The folder benchmark (CUDA only) completes 1024 x 1024 images from
files to files with the batched pipeline and records images/s.
"""

import os
import time

import cv2
import numpy as np
import pytest
import torch

from glcic_fast import CompletionNet
from glcic_fast.inference.completion import complete_with
from glcic_fast.inference import roi

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZE = int(os.environ.get("GLCIC_FAST_BENCH_ROI_SIZE", "4096" if CUDA else "1024"))
HOLE = 128
_MEANS = {}


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    net = CompletionNet(bn_after_relu=False).to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    # A smooth random image (the content does not change the cost).
    image = torch.nn.functional.interpolate(torch.rand(1, 3, SIZE // 32, SIZE // 32, generator=g), size=(SIZE, SIZE),
                                            mode="bilinear", align_corners=False)[0].clamp(0, 1).to(DEVICE)
    mask = torch.zeros(1, SIZE, SIZE, device=DEVICE)
    y = x = (SIZE - HOLE) // 2
    mask[:, y:y + HOLE, x:x + HOLE] = 1
    regions = roi.plan(mask[0].cpu())
    return net, image, mask, regions


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _info(benchmark, regions, mode):
    crop = regions[0].crop
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "size": SIZE, "hole": HOLE, "dtype": "float32", "mode": mode,
        "crop": f"{crop.y1 - crop.y0}x{crop.x1 - crop.x0}", "size_env": "GLCIC_FAST_BENCH_ROI_SIZE",
        "weights": "random init (timings do not depend on the weights)"})
    print(f"\n[bench_roi] size {SIZE} x {SIZE}, hole {HOLE} x {HOLE}, crop {crop.y1 - crop.y0} x {crop.x1 - crop.x0}, "
          f"mode {mode}, device {benchmark.extra_info['device']}")


def _record(benchmark, key):
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _MEANS[key] = stats.stats.mean


def _run(net, image, mask, use_roi):
    out = complete_with(net, image, mask, roi=use_roi)
    _sync()
    return out


@pytest.mark.benchmark(group=f"roi-{SIZE}", warmup=False)
def test_whole_image(benchmark, problem):
    net, image, mask, regions = problem
    _info(benchmark, regions, "whole image (roi=False)")
    rounds = 3 if CUDA else 1
    _run(net, image, mask, False) if CUDA else None  # warm-up (cuDNN algorithm choice) where cheap
    out = benchmark.pedantic(_run, args=(net, image, mask, False), rounds=rounds, iterations=1)
    _record(benchmark, "whole")
    _MEANS["whole_output"] = out[:, mask[0] > 0].cpu()


@pytest.mark.benchmark(group=f"roi-{SIZE}", warmup=False)
def test_roi(benchmark, problem):
    net, image, mask, regions = problem
    _info(benchmark, regions, "ROI crop (roi=True)")
    _run(net, image, mask, True)  # warm-up
    out = benchmark.pedantic(_run, args=(net, image, mask, True), rounds=5, iterations=1)
    _record(benchmark, "roi")
    if "whole_output" in _MEANS:  # a fast result that is wrong is not a result
        assert (out[:, mask[0] > 0].cpu() - _MEANS["whole_output"]).abs().max().item() <= 1e-4
    if "whole" in _MEANS and "roi" in _MEANS:
        ratio = _MEANS["whole"] / _MEANS["roi"]
        benchmark.extra_info["speedup_vs_whole"] = round(ratio, 1)
        print(f"[bench_roi] ROI speed-up over the whole image at {SIZE} x {SIZE}: {ratio:.1f}x")


FOLDER_SIZE, FOLDER_IMAGES = 1024, 64


@pytest.fixture(scope="module")
def folder_jobs(tmp_path_factory):
    """FOLDER_IMAGES PNGs of FOLDER_SIZE^2 with a 128 x 128 hole each, made once."""
    from glcic_fast.inference.batching import Job

    path = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(FOLDER_IMAGES):
        small = (rng.random((FOLDER_SIZE // 32, FOLDER_SIZE // 32, 3)) * 255).astype(np.uint8)
        image = cv2.resize(small, (FOLDER_SIZE, FOLDER_SIZE), interpolation=cv2.INTER_LINEAR)
        mask = np.zeros((FOLDER_SIZE, FOLDER_SIZE), np.uint8)
        y, x = rng.integers(0, FOLDER_SIZE - 128, 2)
        mask[y:y + 128, x:x + 128] = 255
        cv2.imwrite(str(path / f"{i:03d}.png"), image)
        cv2.imwrite(str(path / f"{i:03d}_mask.png"), mask)
        jobs.append(Job(str(path / f"{i:03d}.png"), str(path / f"{i:03d}_mask.png"), str(path / f"{i:03d}_out.png")))
    return jobs


@pytest.mark.skipif(not CUDA, reason="folder throughput is measured on a GPU")
@pytest.mark.benchmark(group="folder-1024", warmup=False)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_folder_throughput(benchmark, folder_jobs, dtype):
    """Files to files, as ``glcic-fast complete DIR`` runs: each call starts its decoding
    workers and captures its CUDA graph (one per batch shape) again; the warm-up call
    leaves only Triton's autotuning and the kernels' compilation out of the timed one."""
    from glcic_fast.devices import parse_dtype
    from glcic_fast.inference.batching import complete_files

    jobs = folder_jobs
    torch.manual_seed(0)
    # Already in the dtype: complete_files then runs it as it is (no copy per call).
    net = CompletionNet(bn_after_relu=False).to(DEVICE, parse_dtype(dtype)).eval()
    complete_files(net, jobs[:8], batch_size=8)  # warm-up: autotuning, compilation

    def run():
        return complete_files(net, jobs, batch_size=8, num_workers=4, num_writers=4)

    stats = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({"device": torch.cuda.get_device_name(), "size": FOLDER_SIZE,
                                 "images": FOLDER_IMAGES, "dtype": dtype, "batch_size": 8,
                                 "images_per_second": round(stats.images_per_second, 2)})
    print(f"\n[bench_roi] folder of {FOLDER_IMAGES} {FOLDER_SIZE}x{FOLDER_SIZE} PNGs, {dtype}: "
          f"{stats.images_per_second:.1f} images/s")
