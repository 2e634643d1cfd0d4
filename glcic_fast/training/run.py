"""A training run, step by step: open the run folder (a new run, or the resume of the one
there), set up the device, the data and the trainer, then the loop, which logs, and
checkpoints every ``checkpoint_every`` steps, at the end, and when a signal asks it to stop.

Checkpoints hold everything an exact resume needs: both nets, both optimisers, the step
(with the phase and the data stream's epoch and position), every process's Python, numpy,
torch and CUDA random states, the mean pixel and the config. They are written atomically
(temporary file in the run folder, fsync, ``os.replace``); the newest ``keep`` are kept.
Resuming from a checkpoint reproduces the uninterrupted run bit for bit where the
kernels are deterministic (on the CPU; on CUDA with ``deterministic=True``).

A new run with ``init`` starts its completion net from those weights (init_weights.py).
"""

import contextlib
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from glcic_fast.devices import default_device
from glcic_fast.nn.weights import save as save_weights
from glcic_fast.training.checkpoints import capture_rng, checkpoint_path, restore_rng, save_checkpoint
from glcic_fast.training.config import TrainConfig, TrainingError, check_same_run, continuing_config
from glcic_fast.training.data import (ImageFolder, StepBatchSampler, compute_mean_pixel, files_digest,
                                      stream_position, worker_init)
from glcic_fast.training.distributed import is_distributed, process_group, rank_and_world
from glcic_fast.training.init_weights import InitialWeights, load_initial_weights
from glcic_fast.training.run_folder import (IMAGES_FILE, WEIGHTS_FILE, RunStart, open_run, prepare_folder,
                                            write_config_file)
from glcic_fast.training.run_log import RunLog
from glcic_fast.training.trainer import Trainer

log = logging.getLogger(__name__)


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Run (or, with ``resume``, continue) training in ``config.out``. Returns a summary:
    final step, the last checkpoint's path, whether the run was interrupted and by which
    signal. Call in each process under torchrun; the process group is set up here from
    the environment if needed."""
    with process_group(config.device):
        return _run(config, open_run(config.out, resume))


def resume_run(data: str, out: str, **given) -> dict:
    """Continue the run in ``out`` (or start it, where it has no checkpoint yet) with the
    settings ``given``; those not given are the run's own but for the session's
    (``continuing_config``). What ``glcic-fast train --resume`` does; returns ``train``'s
    summary."""
    with process_group(given.get("device")):
        start = open_run(out, resume=True)
        return _run(continuing_config(start.saved_config, data, out, given), start)


def _run(cfg: TrainConfig, start: RunStart) -> dict:
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise TrainingError(f"the global batch {cfg.batch_size} must be a multiple of the {world} processes")
    device = _set_up_device(cfg)
    if start.saved_config is not None:
        check_same_run(start.saved_config, cfg, start.step)
    # The weights to start from: read for a new run only (a checkpoint holds the run's own).
    init = load_initial_weights(cfg) if start.state is None else None
    data = _prepare_data(cfg, start, device, init)
    # The config as the run keeps it, with where its initial weights came from.
    init_record = init.record if init is not None else (start.saved_config or {}).get("init_weights")
    record = dict(cfg.to_dict(), mean_pixel=list(data.mean_pixel), init_weights=init_record)
    if rank == 0 and start.state is None:
        write_config_file(cfg, record, len(data.dataset), data.digest, world)
    trainer = _build_trainer(cfg, start, data.mean_pixel, device, init)
    out = RunLog(cfg, cfg.out, trainer.step, enabled=rank == 0)
    try:
        if start.state is not None:
            at = cfg.phase(trainer.step) if trainer.step < cfg.total_steps else "done"
            out.write(f"resumed from {start.checkpoint} at step {trainer.step} ({at})")
        elif init is not None:
            out.write(f"completion net from {init.record['weights']}; discriminator and optimisers fresh")
        loader = _data_loader(cfg, data.dataset, trainer.step, device)
        checkpoints = _Checkpointer(cfg, trainer, record, data, device, last=start.checkpoint)
        with _StopSignals(device) as stop:
            return _loop(cfg, trainer, loader, checkpoints, out, stop)
    finally:
        out.close()


def _set_up_device(cfg: TrainConfig) -> torch.device:
    """This process's device (``default_device``), made the current one, and the kernels'
    settings: cuDNN's autotuner and TF32 on CUDA, or deterministic kernels where asked."""
    device = default_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    return device


# -- the data ---------------------------------------------------------------------------------------

@dataclass
class _Data:
    dataset: ImageFolder
    #: The image list's digest (a resumed run must see the same list).
    digest: str
    mean_pixel: List[float]


def _prepare_data(cfg: TrainConfig, start: RunStart, device: torch.device, init: Optional[InitialWeights]) -> _Data:
    """The run's images (its image list, the one the checkpoint saw) and mean pixel."""
    files = prepare_folder(cfg.out, cfg.data)
    digest = files_digest(files)
    if start.state is not None and start.state["data"]["files_digest"] != digest:
        raise TrainingError(f"{os.path.join(cfg.out, IMAGES_FILE)} does not match the checkpoint's image list")
    dataset = ImageFolder(cfg.data, cfg.augmentation(), cfg.seed, files=files)
    return _Data(dataset, digest, _mean_pixel(cfg, start, dataset, device, init))


def _mean_pixel(cfg: TrainConfig, start: RunStart, dataset: ImageFolder, device: torch.device,
                init: Optional[InitialWeights]) -> List[float]:
    """The checkpoint's, the run's, the one given, the initial weights', or computed now
    (once, each process reading its share of the images)."""
    rank, world = rank_and_world()
    if start.state is not None:
        mean = start.state["mean_pixel"]
    elif start.saved_config is not None and start.saved_config.get("mean_pixel") is not None:
        mean = start.saved_config["mean_pixel"]
    elif cfg.mean_pixel is not None:
        mean = list(cfg.mean_pixel)
    elif init is not None:
        mean = init.mean_pixel
    else:
        def reduce(t):
            if is_distributed():
                moved = t.to(device)
                dist.all_reduce(moved)
                t.copy_(moved.cpu())
        mean = compute_mean_pixel(dataset, max_images=cfg.mean_images, workers=cfg.workers, rank=rank,
                                  world_size=world, reduce=reduce, progress=cfg.progress and rank == 0)
    if cfg.mean_pixel is not None and not np.allclose(cfg.mean_pixel, mean, atol=1e-6):
        raise TrainingError(f"the run's mean pixel is {mean}, asked for {list(cfg.mean_pixel)}")
    return mean


def _data_loader(cfg: TrainConfig, dataset: ImageFolder, start_step: int, device: torch.device):
    """This process's share of every global batch from ``start_step`` to the run's end."""
    rank, world = rank_and_world()
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, rank=rank, world_size=world,
                               start_step=start_step, end_step=cfg.total_steps)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                                       pin_memory=device.type == "cuda",
                                       worker_init_fn=worker_init if cfg.workers else None,
                                       persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
                                       # Its own generator: the global random states stay the run's.
                                       generator=torch.Generator().manual_seed(cfg.seed))


# -- the trainer ------------------------------------------------------------------------------------

def _build_trainer(cfg: TrainConfig, start: RunStart, mean_pixel: List[float], device: torch.device,
                   init: Optional[InitialWeights]) -> Trainer:
    """Both nets from the seed (the completion net then from the initial weights, where
    there are some), or as the checkpoint has them with this process's random states
    (seeded otherwise: the nets' initial weights come from torch's; the data use their
    own streams)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    trainer = Trainer(cfg, mean_pixel, device)
    if init is not None:
        trainer.completion.load_state_dict(init.state)
    if start.state is not None:
        trainer.load_state_dict(start.state)
        rank, world = rank_and_world()
        rngs = start.state["rng"]
        if len(rngs) == world:
            restore_rng(rngs[rank], device)
        else:
            log.warning("the checkpoint was written by %d processes, this run has %d: random states are not "
                        "restored (training uses none; data order and augmentation do not depend on them)",
                        len(rngs), world)
    return trainer


# -- the loop ---------------------------------------------------------------------------------------

def _loop(cfg: TrainConfig, trainer: Trainer, loader, checkpoints: "_Checkpointer", out: RunLog,
          stop: "_StopSignals") -> dict:
    """Steps to the run's end, logged and checkpointed; when a signal asks, the loop stops
    after the step at hand, checkpointed."""
    total, rank = cfg.total_steps, rank_and_world()[0]
    meter = _Meter()
    for batch in loader:
        meter.add(trainer.train_step(batch))
        step = trainer.step
        out.advance()
        at_log = step % cfg.log_every == 0 or step == total
        if at_log:
            losses, speed = meter.read(cfg.batch_size)
            if not all(math.isfinite(v) for v in losses.values()):
                raise TrainingError(f"non-finite loss at step {step}: {losses}; the last checkpoint "
                                    f"({checkpoints.last}) is intact: resume from it (perhaps with a smaller --lr)")
            out.scalars(step, cfg.phase(step - 1), {**losses, **speed})
        if step % cfg.image_every == 0 and rank == 0:
            out.image(step, trainer.sample_grid())
        interrupted = stop.agreed(collective=at_log)
        if step % cfg.checkpoint_every == 0 or step == total or interrupted:
            checkpoints.save()
        if interrupted:
            out.write(f"stopped by signal at step {step}; checkpoint {checkpoints.last}")
            return {"step": step, "checkpoint": checkpoints.last, "interrupted": True,
                    "signal": stop.received or signal.SIGTERM}
    if trainer.step == total and not (checkpoints.last or "").endswith(f"{total:09d}.pt"):
        checkpoints.save()  # a run resumed at its end (or with no steps) still has one
    return {"step": trainer.step, "checkpoint": checkpoints.last, "interrupted": False, "signal": None}


class _Meter:
    """The step metrics between two log rows."""

    def __init__(self):
        self._start(time.perf_counter())

    def _start(self, now: float):
        self.sums: Dict[str, torch.Tensor] = {}
        self.count, self.since = 0, now

    def add(self, metrics: Dict[str, torch.Tensor]):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.double()
        self.count += 1

    def read(self, batch_size: int) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(each metric's mean since the last read, over the steps and the processes;
        seconds per step and images per second since then), and a new start."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]) / self.count
        if is_distributed():
            dist.all_reduce(values)
            values /= rank_and_world()[1]
        means = dict(zip(keys, values.tolist()))
        now = time.perf_counter()
        speed = {"sec_per_step": (now - self.since) / self.count,
                 "images_per_sec": batch_size * self.count / (now - self.since)}
        self._start(now)
        return means, speed


# -- checkpointing and stopping ---------------------------------------------------------------------

class _Checkpointer:
    """Writes the run's checkpoints. Every process takes part (each adds its random
    states); rank 0 writes the file, and beside it the completion net's weights file for
    glcic_fast.load."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer, record: dict, data: _Data, device: torch.device,
                 last: Optional[str]):
        self.cfg, self.trainer, self.record, self.data, self.device = cfg, trainer, record, data, device
        #: The newest checkpoint's path.
        self.last = last

    def save(self) -> str:
        rank, world = rank_and_world()
        rngs = [capture_rng(self.device)]
        if is_distributed():
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        cfg, step, run_dir = self.cfg, self.trainer.step, self.cfg.out
        if rank == 0:
            state = self.trainer.state_dict()
            num_images = len(self.data.dataset)
            epoch, position = stream_position(step, cfg.batch_size, num_images)
            state.update(config=self.record, rng=rngs,
                         data={"seed": cfg.seed, "global_batch": cfg.batch_size, "num_images": num_images,
                               "files_digest": self.data.digest, "samples_seen": step * cfg.batch_size,
                               "epoch": epoch, "position": position, "world_size": world})
            self.last = save_checkpoint(state, run_dir, cfg.keep)
            save_weights(self.trainer.completion, os.path.join(run_dir, WEIGHTS_FILE))
        else:
            self.last = checkpoint_path(run_dir, step)
        if is_distributed():
            dist.barrier()
        return self.last


class _StopSignals:
    """While open, SIGTERM and SIGINT (a scheduler, ``timeout``, Ctrl-C) do not end the
    process: they ask the loop to stop, checkpointed. The previous handlers come back at
    the end."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else torch.device("cpu")
        #: The signal received, if any.
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)

    def agreed(self, collective: bool) -> bool:
        """Whether to stop now. Several processes stop together, which takes a collective:
        they agree at ``collective`` steps only (the log steps), and go on in between."""
        if not is_distributed():
            return self.received is not None
        if not collective:
            return False
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
