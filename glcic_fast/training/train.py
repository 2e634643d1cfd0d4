"""The paper's training (SPEC.md sections 2-4), fast and safe to run for days.

Phases, by global step s (0-based):

- ``completion`` (s < Tc): C alone, masked MSE on the hole.
- ``discriminator`` (Tc <= s < Tc + Td): C fixed, D trained with binary cross-entropy,
  real images against completed ones.
- ``joint`` (after): each step, D is trained as in the previous phase, then C with
  MSE + alpha * adversarial loss against the updated D.

Both nets use ADADELTA (Torch's defaults: rho 0.9, eps 1e-6, lr 1).

Choices the paper leaves open, made here (all in ``TrainConfig``):

- The completed image is ``x (.) (1 - M) + C(x, M) (.) M``: D sees exactly what
  inference produces, and the adversarial gradient reaches C through the hole only.
- The MSE is the paper's || M (.) (C(x, M) - x) ||^2 divided by the number of masked
  values in the global batch (``mse_reduction="mean"``, the default) or not divided
  (``"sum"``). alpha weighs the adversarial term against this value.
- D's loss is the mean of BCE(D(real), 1) and BCE(D(completed), 0). C's adversarial loss
  is ``non_saturating`` (BCE(D(completed), 1) = -log D, as GLCIC-PyTorch) or the paper's
  ``minimax`` log(1 - D).
- D ends in a logit; sigmoid(logit) is the paper's probability (see discriminator.py).
  The losses use BCE-with-logits, which stays finite when D is confident.
- "Fixed" means fixed: where a net is not trained (C in the discriminator phase; D while
  C is updated in the joint phase) it runs in training mode (batch statistics, as the
  net being trained sees it) but neither its parameters nor its BatchNorm running
  statistics change.

Several processes (torchrun): one DDP replica per process, NCCL on GPUs, gloo on CPUs.
BatchNorm is synchronised across processes (``torch.nn.SyncBatchNorm`` on GPUs,
``GlooSyncBatchNorm2d`` here on CPUs) and every loss is normalised by global counts, so a
run with W processes of batch B / W computes the same losses, gradients and updates as one
process with batch B, up to floating-point summation order; the data are the same
samples by construction (glcic_fast.training.data).

Checkpoints hold everything an exact resume needs: both nets, both optimisers, the step
(with the phase and the data stream's epoch and position), every process's Python, numpy,
torch and CUDA random states, the mean pixel and the config. They are written atomically
(temporary file in the run folder, fsync, ``os.replace``); the newest ``keep`` are kept.
Resuming from a checkpoint reproduces the uninterrupted run bit for bit where the
kernels are deterministic (on the CPU; on CUDA with ``deterministic=True``).
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glcic_fast import ops
from glcic_fast.training.checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CONFIG_FILE, IMAGES_FILE, RUN_FILES,
                          WEIGHTS_FILE, capture_rng, checkpoint_path, latest_checkpoint,
                          list_checkpoints, load_checkpoint, restore_rng, save_checkpoint, write_json)
from glcic_fast.training.data import (Augmentation, ImageFolder, StepBatchSampler, compute_mean_pixel, crop_squares, files_digest,
                   hole_mask, list_images, stream_position, worker_init)
from glcic_fast.nn.discriminator import PAPER_CHANNELS, ContextDiscriminator
from glcic_fast.training.distributed import broadcast_object, convert_sync_batchnorm, is_distributed, rank_and_world
from glcic_fast.files import TMP_NAME, atomic_write
from glcic_fast.nn.completion_net import MEAN_FILLED_HOLE, MEAN_SUBTRACTED_ZERO_HOLE, CompletionNet
from glcic_fast.training.run_log import RunLog

log = logging.getLogger(__name__)

PHASES = ("completion", "discriminator", "joint")
ADVERSARIAL_LOSSES = ("non_saturating", "minimax")


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad run folder, mismatched resume, divergence)."""


@dataclass
class TrainConfig:
    data: str
    out: str
    #: Steps of the three phases (Tc, Td, joint); the paper: 90000, 10000, 400000.
    phase_steps: Tuple[int, int, int] = (90000, 10000, 400000)
    #: Global batch (over all processes); the paper: 96.
    batch_size: int = 96
    image_size: int = 256
    local_size: int = 128
    hole_range: Tuple[int, int] = (96, 128)
    #: Shorter side before the crop; default (image_size, 1.5 image_size) = paper's (256, 384).
    scale_range: Optional[Tuple[int, int]] = None
    alpha: float = 0.0004
    adversarial: str = "non_saturating"
    mse_reduction: str = "mean"
    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    #: Block order of both nets: False conv -> BN -> ReLU (paper), True conv -> ReLU -> BN.
    bn_after_relu: bool = False
    disc_channels: Tuple[int, ...] = PAPER_CHANNELS
    seed: int = 0
    #: "cuda", "cuda:N" or "cpu"; default cuda where there is one.
    device: Optional[str] = None
    #: "auto" (bf16 autocast on CUDA, off on CPU), "bf16" or "off".
    amp: str = "auto"
    #: channels_last activations; default on CUDA.
    channels_last: Optional[bool] = None
    #: "float32" (parameters and activations; bf16 autocast on top where amp is on) or
    #: "float64", for verification: DDP against one process, resume, ... without the
    #: float32 rounding that deep BatchNorm nets amplify (amp must be off).
    precision: str = "float32"
    #: Deterministic kernels (bit-exact resume on CUDA, slower).
    deterministic: bool = False
    workers: int = 4
    checkpoint_every: int = 1000
    keep: int = 3
    log_every: int = 10
    image_every: int = 1000
    tensorboard: bool = True
    progress: bool = True
    #: RGB in [0, 1]; default: computed over the data set once, at the start of the run.
    mean_pixel: Optional[Tuple[float, float, float]] = None
    #: Compute the mean pixel over a seeded random subset of this many images.
    mean_images: Optional[int] = None

    def __post_init__(self):
        self.phase_steps = tuple(int(v) for v in self.phase_steps)
        self.hole_range = tuple(int(v) for v in self.hole_range)
        self.disc_channels = tuple(int(v) for v in self.disc_channels)
        if self.scale_range is not None:
            self.scale_range = tuple(int(v) for v in self.scale_range)
        if self.mean_pixel is not None:
            self.mean_pixel = tuple(float(v) for v in self.mean_pixel)
        if len(self.phase_steps) != 3 or any(v < 0 for v in self.phase_steps):
            raise ValueError(f"phase_steps must be three non-negative step counts, got {self.phase_steps}")
        if self.adversarial not in ADVERSARIAL_LOSSES:
            raise ValueError(f"adversarial must be one of {ADVERSARIAL_LOSSES}, got {self.adversarial!r}")
        if self.mse_reduction not in ("mean", "sum"):
            raise ValueError(f"mse_reduction must be 'mean' or 'sum', got {self.mse_reduction!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {self.precision!r}")
        if self.precision == "float64" and self.amp == "bf16":
            raise ValueError("precision float64 is for exact verification: use amp 'off' (or 'auto' on a CPU)")
        for name in ("batch_size", "checkpoint_every", "keep", "log_every", "image_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.augmentation()  # validates the sizes

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps)

    def augmentation(self) -> Augmentation:
        return Augmentation(self.image_size, self.local_size, self.hole_range, self.scale_range)

    def phase(self, step: int) -> str:
        tc, td, _ = self.phase_steps
        return PHASES[0] if step < tc else PHASES[1] if step < tc + td else PHASES[2]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Settings a resumed run must share with the checkpoint for the resume to continue the
#: same run (data, losses, optimiser, nets). The others may change between sessions.
RUN_DEFINING = ("batch_size", "image_size", "local_size", "hole_range", "scale_range", "alpha", "adversarial",
                "mse_reduction", "lr", "rho", "eps", "bn_after_relu", "disc_channels", "seed", "precision")


@contextlib.contextmanager
def frozen(module: nn.Module):
    """``module`` runs as in training (batch statistics) but changes nothing: no parameter
    gradients and no BatchNorm running-statistics update."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    params = [p for p in module.parameters() if p.requires_grad]
    for m in bns:
        m.track_running_stats = False
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for m in bns:
            m.track_running_stats = True
        for p in params:
            p.requires_grad_(True)


class _DiscriminatorPair(nn.Module):
    """D on the real and the completed batch in one forward (one DDP forward per backward);
    separate calls, so each batch has its own BatchNorm statistics."""

    def __init__(self, discriminator: ContextDiscriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real_local, real_global, fake_local, fake_global):
        return self.discriminator(real_local, real_global), self.discriminator(fake_local, fake_global)


# -- the trainer ---------------------------------------------------------------------------------

class Trainer:
    """Both nets, both optimisers and the step; ``train_step`` runs one step of the phase
    the step is in. Used by ``train`` (the run loop) and directly by tests and benchmarks."""

    def __init__(self, config: TrainConfig, mean_pixel: Sequence[float], device=None):
        self.config = cfg = config
        self.rank, self.world_size = rank_and_world()
        self.device = torch.device(device or _default_device(cfg))
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda"
                                         and cfg.precision == "float32")
        self.channels_last = self.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.mean_pixel = [float(v) for v in mean_pixel]
        self.dtype = torch.float64 if cfg.precision == "float64" else torch.float32

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.completion = CompletionNet(cfg.bn_after_relu, mean_pixel=self.mean_pixel)
        self.discriminator = ContextDiscriminator(cfg.local_size, cfg.image_size, cfg.bn_after_relu,
                                                  channels=cfg.disc_channels)
        if self.world_size > 1:
            convert_sync_batchnorm(self.completion, self.device)
            convert_sync_batchnorm(self.discriminator, self.device)
        for net in (self.completion, self.discriminator):
            net.to(self.device, self.dtype, memory_format=self.memory_format).train()
        self.opt_c = torch.optim.Adadelta(self.completion.parameters(), lr=cfg.lr, rho=cfg.rho, eps=cfg.eps)
        self.opt_d = torch.optim.Adadelta(self.discriminator.parameters(), lr=cfg.lr, rho=cfg.rho, eps=cfg.eps)
        self.c_forward = self.completion
        self.d_pair = _DiscriminatorPair(self.discriminator)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            import inspect

            kw = {"device_ids": [self.device] if self.device.type == "cuda" else None}
            # Synchronised BatchNorm keeps the buffers equal: no broadcast before each forward.
            if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
                kw["forward_sync_buffers"] = False
            else:
                kw["broadcast_buffers"] = False
            self.c_forward = DDP(self.completion, **kw)
            self.d_pair = DDP(self.d_pair, **kw)
        self.step = 0

    @property
    def phase(self) -> str:
        return self.config.phase(self.step)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def prepare_batch(self, batch: dict):
        """(x in [0, 1], hole mask, fake-patch corners, real-patch corners) on the device."""
        dev, s = self.device, self.config.image_size
        x = batch["image"].to(dev, non_blocking=True).to(self.dtype).div_(255)
        x = x.contiguous(memory_format=self.memory_format)
        mask = hole_mask(batch["hole"].to(dev, non_blocking=True), s, self.dtype)
        mask = mask.contiguous(memory_format=self.memory_format)
        return x, mask, batch["local_fake"].to(dev, non_blocking=True), batch["local_real"].to(dev, non_blocking=True)

    def _mse(self, completed: torch.Tensor, x: torch.Tensor, mask: torch.Tensor):
        """(loss to back-propagate on this process, its metric)."""
        if completed.dtype == torch.float64:  # verification runs: the same formula, eagerly
            total = ((completed - x) * mask).square().sum()
        else:
            total = ops.masked_mse(completed, x, mask, reduction="sum")
        if self.config.mse_reduction == "mean":
            count = mask.sum(dtype=torch.float32) * x.shape[1]
            if self.world_size > 1:
                dist.all_reduce(count)
            count = count.clamp_min(1)
        else:
            count = torch.ones((), device=x.device)
        # DDP averages gradients over processes: scale by the world size so that the result
        # is the gradient of the global sum (or mean).
        scaled = total * (self.world_size / count)
        # The metric is this process's share times W, so that the mean over processes
        # (what the log shows) is the global value.
        return scaled, scaled.detach()

    def _d_step(self, x, completed, fake_at, real_at) -> Dict[str, torch.Tensor]:
        local = self.config.local_size
        completed = completed.detach()
        with self._autocast():
            real_logit, fake_logit = self.d_pair(crop_squares(x, real_at, local), x,
                                                 crop_squares(completed, fake_at, local), completed)
        real_logit, fake_logit = real_logit.to(self.dtype), fake_logit.to(self.dtype)
        loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                      + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return {"d_loss": loss.detach(), "d_real": torch.sigmoid(real_logit).mean().detach(),
                "d_fake": torch.sigmoid(fake_logit).mean().detach()}

    def _complete(self, x, mask):
        inp = self.completion.prepare_input(x, mask).contiguous(memory_format=self.memory_format)
        with self._autocast():
            out = self.c_forward(inp)
        out = out.to(self.dtype)
        return out, x + mask * (out - x)

    def train_step(self, batch: dict) -> Dict[str, torch.Tensor]:
        """One step of the current phase on ``batch`` (this process's share of the global
        batch, as the data loader gives it). Returns detached metrics (device tensors)."""
        x, mask, fake_at, real_at = self.prepare_batch(batch)
        phase = self.phase
        if phase == "completion":
            out, _ = self._complete(x, mask)
            loss, mse = self._mse(out, x, mask)
            self.opt_c.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_c.step()
            metrics = {"mse": mse}
        elif phase == "discriminator":
            with torch.no_grad(), frozen(self.completion):
                out, completed = self._complete(x, mask)
            metrics = self._d_step(x, completed, fake_at, real_at)
            metrics["mse"] = self._mse(out, x, mask)[1]
        else:
            out, completed = self._complete(x, mask)
            metrics = self._d_step(x, completed, fake_at, real_at)
            loss, mse = self._mse(out, x, mask)
            with frozen(self.discriminator), self._autocast():
                logit = self.discriminator(crop_squares(completed, fake_at, self.config.local_size), completed)
            logit = logit.to(self.dtype)
            if self.config.adversarial == "non_saturating":  # -log D(C(x))
                adv = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
            else:  # the paper's log(1 - D(C(x))) = -BCE(logit, 0)
                adv = -F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit))
            total = loss + self.config.alpha * adv
            self.opt_c.zero_grad(set_to_none=True)
            total.backward()
            self.opt_c.step()
            metrics.update(mse=mse, adv_loss=adv.detach())
        self.step += 1
        self._last = tuple(t[:4].detach() for t in (x, mask, out))
        return metrics

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Nets, optimisers and step (the run loop adds random states, data and config)."""
        return {"step": self.step, "phase": self.config.phase(max(self.step - 1, 0)),
                "completion": _to_cpu(self.completion.state_dict()),
                "discriminator": _to_cpu(self.discriminator.state_dict()),
                "opt_c": self.opt_c.state_dict(), "opt_d": self.opt_d.state_dict(),
                "mean_pixel": list(self.mean_pixel)}

    def load_state_dict(self, state: dict):
        self.completion.load_state_dict(state["completion"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_c.load_state_dict(state["opt_c"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step = int(state["step"])

    def sample_grid(self, n: int = 4) -> Optional[torch.Tensor]:
        """3 x H x W image of up to ``n`` rows [input as the net sees it | completion |
        truth] from the last step, or None before the first step."""
        if getattr(self, "_last", None) is None:
            return None
        x, mask, out = (t[:n].float().cpu() for t in self._last)
        mean = torch.tensor(self.mean_pixel).view(1, 3, 1, 1)
        shown_input = x * (1 - mask) + mean * mask
        completed = x * (1 - mask) + out * mask
        rows = torch.cat([shown_input, completed, x], dim=3)  # n x 3 x S x 3S
        return torch.cat(list(rows), dim=1).clamp(0, 1)


def _to_cpu(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in state.items()}


def _default_device(cfg: TrainConfig) -> str:
    if cfg.device:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and dev.index is None and is_distributed():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return str(dev)
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


# -- the run ----------------------------------------------------------------------------------------

def _check_resume_config(saved: dict, cfg: TrainConfig, done: int):
    problems = []
    for key in RUN_DEFINING:
        theirs, ours = saved.get(key, TrainConfig.__dataclass_fields__[key].default), getattr(cfg, key)
        if isinstance(theirs, list):
            theirs = tuple(theirs)
        if key == "scale_range":  # compare the effective ranges
            theirs = tuple(Augmentation(saved["image_size"], saved["local_size"], saved["hole_range"],
                                        theirs).scale_range)
            ours = cfg.augmentation().scale_range
        if theirs != ours:
            problems.append(f"{key}: run has {theirs!r}, asked for {ours!r}")
    old = tuple(saved["phase_steps"])
    tc, td = old[0], old[0] + old[1]
    new_tc, new_td = cfg.phase_steps[0], cfg.phase_steps[0] + cfg.phase_steps[1]
    # Phase boundaries already passed cannot move; later ones may (e.g. a longer joint phase).
    if (min(done, tc) != min(done, new_tc)) or (min(done, td) != min(done, new_td)):
        problems.append(f"phase_steps: run has {old}, asked for {cfg.phase_steps}: "
                        f"the {done} steps done would belong to other phases")
    if problems:
        raise TrainingError("the run folder holds a different run; resume it with the same settings "
                            "(or start a new run in another folder):\n  " + "\n  ".join(problems))


def _prepare_run_dir(cfg: TrainConfig, resume: bool):
    """Rank 0: decide fresh or resume. Returns (checkpoint path or None, state or None,
    saved config or None)."""
    run_dir = cfg.out
    entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise TrainingError(f"--out {run_dir} exists and is not a folder")
    if entries and not resume:
        raise TrainingError(f"the run folder {run_dir} is not empty; pass --resume to continue the run in it, "
                            "or choose a new --out (nothing there is deleted or overwritten)")
    found = latest_checkpoint(run_dir) if entries else None
    if found is not None:
        return found[0], found[1], found[1]["config"]
    if entries:
        if list_checkpoints(run_dir):
            raise TrainingError(f"no checkpoint in {run_dir} could be read")
        if not all(e in RUN_FILES or TMP_NAME.match(e) for e in entries):
            raise TrainingError(f"{run_dir} is not empty and holds no glcic_fast run; choose a new --out")
        # Only this run's own files: it stopped before its first checkpoint (while computing
        # the mean pixel, say). Start it again, keeping its image list and settings.
        saved_path = os.path.join(run_dir, CONFIG_FILE)
        if os.path.exists(saved_path):
            with open(saved_path) as f:
                return None, None, json.load(f)["config"]
    return None, None, None


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training in ``config.out``. Returns a summary: final step, the last
    checkpoint's path, whether the run was interrupted. Call in each process under
    torchrun; the process group is set up here from the environment if needed."""
    cfg = config
    owns_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        want_cuda = (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if want_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if want_cuda else "gloo")
        owns_group = True
    try:
        return _train(cfg, resume)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool) -> dict:
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise TrainingError(f"the global batch {cfg.batch_size} must be a multiple of the {world} processes")
    device = torch.device(_default_device(cfg))
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

    # Rank 0 decides fresh start or resume; every process learns the decision (or the error)
    # and reads the checkpoint itself (no broadcast of hundreds of megabytes).
    state, decision = None, None
    if rank == 0:
        try:
            ckpt_path, state, saved_cfg = _prepare_run_dir(cfg, resume)
            decision = ("ok", ckpt_path, saved_cfg)
        except TrainingError as exc:
            decision = ("error", str(exc), None)
    decision = broadcast_object(decision)
    if decision[0] == "error":
        raise TrainingError(decision[1])
    _, ckpt_path, saved_cfg = decision
    if rank != 0 and ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
    if saved_cfg is not None:
        _check_resume_config(saved_cfg, cfg, int(state["step"]) if state else 0)

    run_dir = cfg.out
    images_path = os.path.join(run_dir, IMAGES_FILE)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        for name in os.listdir(run_dir):  # temporary files of a save that was killed
            if TMP_NAME.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(run_dir, name))
        if not os.path.exists(images_path):
            files = list_images(cfg.data)
            atomic_write(images_path, lambda f: f.write("".join(n + "\n" for n in files)), mode="w")
    if is_distributed():
        dist.barrier()
    with open(images_path) as f:
        files = [line.rstrip("\n") for line in f if line.strip()]
    digest = files_digest(files)
    if state is not None and state["data"]["files_digest"] != digest:
        raise TrainingError(f"{images_path} does not match the checkpoint's image list")

    dataset = ImageFolder(cfg.data, cfg.augmentation(), cfg.seed, files=files)
    # The mean pixel: the checkpoint's, the run's, the one given, or computed now (once).
    mean = None
    if state is not None:
        mean = state["mean_pixel"]
    elif saved_cfg is not None and saved_cfg.get("mean_pixel") is not None:
        mean = saved_cfg["mean_pixel"]
    elif cfg.mean_pixel is not None:
        mean = list(cfg.mean_pixel)
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
    record = dict(cfg.to_dict(), mean_pixel=list(mean))
    if rank == 0 and state is None:
        write_json(os.path.join(run_dir, CONFIG_FILE),
                    {"config": record, "mean_pixel": list(mean), "mpv": list(mean), "num_images": len(files),
                     "files_digest": digest, "world_size": world,
                     "completion_net": {"bn_after_relu": cfg.bn_after_relu,
                                        "input_convention": MEAN_FILLED_HOLE if cfg.bn_after_relu
                                        else MEAN_SUBTRACTED_ZERO_HOLE}})

    # Seeded global random states (the nets' initial weights come from torch's; the data
    # use their own streams), restored from the checkpoint on resume.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    trainer = Trainer(cfg, mean, device)
    if state is not None:
        trainer.load_state_dict(state)
        rngs = state["rng"]
        if len(rngs) == world:
            restore_rng(rngs[rank], device)
        else:
            log.warning("the checkpoint was written by %d processes, this run has %d: random states are not "
                        "restored (training uses none; data order and augmentation do not depend on them)",
                        len(rngs), world)

    start, total = trainer.step, cfg.total_steps
    out = RunLog(cfg, run_dir, start, enabled=rank == 0)
    if state is not None:
        out.write(f"resumed from {ckpt_path} at step {start} ({cfg.phase(start) if start < total else 'done'})")

    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, rank=rank, world_size=world,
                               start_step=start, end_step=total)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda",
                                         worker_init_fn=worker_init if cfg.workers else None,
                                         persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
                                         # Its own generator: the global random states stay the run's.
                                         generator=torch.Generator().manual_seed(cfg.seed))

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            handlers[sig] = signal.signal(sig, on_signal)

    def checkpoint():
        rngs = [capture_rng(device)]
        if is_distributed():
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if rank == 0:
            full = trainer.state_dict()
            epoch, position = stream_position(trainer.step, cfg.batch_size, len(dataset))
            full.update(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, config=record, rng=rngs,
                        data={"seed": cfg.seed, "global_batch": cfg.batch_size, "num_images": len(dataset),
                              "files_digest": digest, "samples_seen": trainer.step * cfg.batch_size,
                              "epoch": epoch, "position": position, "world_size": world})
            path = save_checkpoint(full, run_dir, cfg.keep)
            from glcic_fast.nn.weights import save as save_weights

            save_weights(trainer.completion, os.path.join(run_dir, WEIGHTS_FILE))
        else:
            path = checkpoint_path(run_dir, trainer.step)
        if is_distributed():
            dist.barrier()
        return path

    sums: Dict[str, torch.Tensor] = {}
    count, t_last, last_path = 0, time.perf_counter(), ckpt_path
    try:
        for batch in loader:
            metrics = trainer.train_step(batch)
            step = trainer.step
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.double()
            count += 1
            out.advance()
            at_log = step % cfg.log_every == 0 or step == total
            if at_log:
                keys = sorted(sums)
                values = torch.stack([sums[k] for k in keys]) / count
                if is_distributed():
                    dist.all_reduce(values)
                    values /= world
                values = dict(zip(keys, values.tolist()))
                if not all(math.isfinite(v) for v in values.values()):
                    raise TrainingError(f"non-finite loss at step {step}: {values}; the last checkpoint "
                                        f"({last_path}) is intact: resume from it (perhaps with a smaller --lr)")
                now = time.perf_counter()
                values["sec_per_step"] = (now - t_last) / count
                values["images_per_sec"] = cfg.batch_size * count / (now - t_last)
                out.scalars(step, cfg.phase(step - 1), values)
                sums, count, t_last = {}, 0, now
            if step % cfg.image_every == 0 and rank == 0:
                out.image(step, trainer.sample_grid())
            interrupted = stop["signal"] is not None
            if is_distributed() and (at_log or step == total):  # agree on stopping (a collective, so not every step)
                flag = torch.tensor([1.0 if interrupted else 0.0], device=device if device.type == "cuda" else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                interrupted = bool(flag.item())
            elif is_distributed():
                interrupted = False
            if step % cfg.checkpoint_every == 0 or step == total or interrupted:
                last_path = checkpoint()
            if interrupted:
                out.write(f"stopped by signal at step {step}; checkpoint {last_path}")
                return {"step": step, "checkpoint": last_path, "interrupted": True,
                        "signal": stop["signal"] or signal.SIGTERM}
        if trainer.step == total and (last_path is None or not last_path.endswith(f"{total:09d}.pt")):
            last_path = checkpoint()  # a run resumed at its end (or with no steps) still has one
        return {"step": trainer.step, "checkpoint": last_path, "interrupted": False, "signal": None}
    finally:
        for sig, handler in handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        out.close()

