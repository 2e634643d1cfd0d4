"""One joint-phase training iteration (SPEC.md section 4): D's step, then C's step.

The iteration is ``Trainer.train_step`` as the run loop calls it: the batch's host-to-
device copy, the mask, C's forward, D on the real and the completed batch, D's backward
and ADADELTA step, D again on the completed batch, C's backward (MSE + alpha *
adversarial) and ADADELTA step.

- CUDA: the paper's size, batch 96 of 256 x 256 crops with 128 x 128 local patches, bf16
  autocast, channels_last, cudnn.benchmark. Target: at most 0.15 s per iteration on
  an H100 (asserted there when timing is on).
- CPU: a tiny case (batch 2, 32 x 32, local 16) that runs anywhere, fp32.

Each with the paper's rectangles (the masks built on the device from their corners) and
with free-form holes (the batch carries its masks: one more host-to-device copy).

And one training sample as a data-loader worker makes it (read, decode, rescale, crop,
the hole), at the paper's size from a real photo, for each kind of hole: the cost of
drawing free-form masks beside the rest of the worker's work.

    pytest benchmarks/bench_train.py --benchmark-only
"""

import numpy as np
import pytest
import torch

from glcic_fast.nn.completion_net import PLACES2_MEAN_PIXEL
from glcic_fast.training import Trainer, TrainConfig
from glcic_fast.training.data import HOLE_KINDS, ImageFolder, centred_patch, draw_free_form, mask_box

from measure import provenance, synchronized

H100_TARGET_S = 0.15


def synthetic_batch(cfg: TrainConfig, seed=0, pin=False):
    """A batch as the data loader gives it: uint8 images, holes (rectangles, or with
    ``cfg.holes == "free"`` free-form masks and their bounding boxes), local-patch corners."""
    n, size, local, hole_range = cfg.batch_size, cfg.image_size, cfg.local_size, cfg.hole_range
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    hh = torch.randint(hole_range[0], hole_range[1] + 1, (n,), generator=g)
    hw = torch.randint(hole_range[0], hole_range[1] + 1, (n,), generator=g)
    hy = (torch.rand(n, generator=g) * (size - hh + 1)).long()
    hx = (torch.rand(n, generator=g) * (size - hw + 1)).long()
    fy = (hy + hh // 2 - local // 2).clamp(0, size - local)
    fx = (hx + hw // 2 - local // 2).clamp(0, size - local)
    real = torch.randint(0, size - local + 1, (n, 2), generator=g)
    batch = {"image": image, "hole": torch.stack([hy, hx, hh, hw], 1), "local_fake": torch.stack([fy, fx], 1),
             "local_real": real}
    if cfg.holes == "free":
        masks = [draw_free_form(size, cfg.augmentation().free_form, np.random.default_rng([seed, i]))
                 for i in range(n)]
        boxes = [mask_box(m) for m in masks]
        batch.update(mask=torch.from_numpy(np.stack(masks)[:, None]), hole=torch.tensor(boxes),
                     local_fake=torch.tensor([centred_patch(b, size, local) for b in boxes]))
    return {k: v.pin_memory() for k, v in batch.items()} if pin else batch


def _bench_joint(benchmark, cfg, rounds, warmup):
    trainer = Trainer(cfg, PLACES2_MEAN_PIXEL)
    assert trainer.phase == "joint"
    batch = synthetic_batch(cfg, pin=trainer.device.type == "cuda")
    metrics = {}

    def step():
        metrics.update(trainer.train_step(batch))

    benchmark.pedantic(synchronized(step), rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert metrics and all(torch.isfinite(v).item() for v in metrics.values()), metrics
    info = provenance()
    info.update({"batch": cfg.batch_size, "image_size": cfg.image_size, "local_size": cfg.local_size,
                 "holes": cfg.holes, "amp_bf16": trainer.amp, "channels_last": trainer.channels_last,
                 "steps_run": trainer.step})
    seconds = benchmark.stats.stats.median if benchmark.stats is not None else None  # None: --benchmark-disable
    if seconds is not None:
        info.update({"seconds_per_iteration": seconds, "images_per_second": cfg.batch_size / seconds})
    benchmark.extra_info.update(info)
    return seconds


@pytest.mark.gpu
@pytest.mark.parametrize("holes", ["rect", "free"])
def test_joint_iteration_cuda_paper_size(benchmark, holes):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the paper-sized joint iteration (batch 96, 256 x 256, bf16 autocast) "
                    "is a GPU benchmark; the tiny CPU case below runs here")
    torch.backends.cudnn.benchmark = True
    benchmark.group = "train-joint-cuda"
    cfg = TrainConfig(data=".", out=".", phase_steps=(0, 0, 10 ** 6), device="cuda", workers=0, holes=holes)
    assert (cfg.batch_size, cfg.image_size, cfg.local_size, cfg.hole_range) == (96, 256, 128, (96, 128))
    seconds = _bench_joint(benchmark, cfg, rounds=10, warmup=3)
    benchmark.extra_info["target_seconds_h100"] = H100_TARGET_S
    if seconds is not None and "H100" in torch.cuda.get_device_name():
        assert seconds <= H100_TARGET_S, f"joint iteration takes {seconds:.3f} s on an H100, target {H100_TARGET_S} s"


@pytest.mark.parametrize("holes", ["rect", "free"])
def test_joint_iteration_cpu_tiny(benchmark, holes):
    benchmark.group = "train-joint-cpu"
    cfg = TrainConfig(data=".", out=".", phase_steps=(0, 0, 10 ** 6), batch_size=2, image_size=32, local_size=16,
                      hole_range=(8, 12), device="cpu", workers=0, holes=holes)
    _bench_joint(benchmark, cfg, rounds=3, warmup=1)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Real photos as a data set: scikit-image's 512 x 512 astronaut, coffee (400 x 600)
    and chelsea (300 x 451), written as JPEG like most training sets."""
    import cv2
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        assert cv2.imwrite(str(root / f"{name}.jpg"), getattr(skimage.data, name)()[:, :, ::-1])
    return str(root)


@pytest.mark.parametrize("holes", HOLE_KINDS)
def test_data_worker_sample_paper_size(benchmark, photo_folder, holes):
    """One sample per call, as a worker makes it (one OpenCV thread): 256 x 256 crop,
    the default hole settings of each kind."""
    import cv2

    benchmark.group = "train-data-sample"
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    cfg = TrainConfig(data=photo_folder, out=".", holes=holes)
    dataset = ImageFolder(photo_folder, cfg.augmentation(), seed=0)
    keys = iter([(epoch, index) for epoch in range(10 ** 4) for index in range(len(dataset))])
    try:
        benchmark.pedantic(lambda: dataset[next(keys)], rounds=60, iterations=1, warmup_rounds=3)
    finally:
        cv2.setNumThreads(threads)
    benchmark.extra_info.update(provenance(), holes=holes, image_size=cfg.image_size)
