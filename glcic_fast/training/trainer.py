"""The paper's training step (SPEC.md sections 2-4): ``Trainer`` holds both nets and both
optimisers and runs one step of the phase the run is in (a run of steps: run.py).

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
  C(x, M) here is the RGB image in [0, 1] that C's output stands for
  (``CompletionNet.output_to_image``: the sigmoid's output itself; mmagic's clamped BGR
  in [-1, 1] mapped back), so the losses and D see images alike whatever C's own range.
- The MSE is the paper's || M (.) (C(x, M) - x) ||^2 divided by the number of masked
  values in the global batch (``mse_reduction="mean"``, the default) or not divided
  (``"sum"``). alpha weighs the adversarial term against this value.
- D's loss is the mean of BCE(D(real), 1) and BCE(D(completed), 0). C's adversarial loss
  is ``non_saturating`` (BCE(D(completed), 1) = -log D, as GLCIC-PyTorch) or the paper's
  ``minimax`` log(1 - D).
- D ends in a logit; sigmoid(logit) is the paper's probability (see discriminator.py).
  The losses use BCE-with-logits, which stays finite when D is confident.
- The hole is the batch's mask, pixel by pixel: a rectangle (built on the device from
  its corners) or a free-form mask (drawn by the data workers). The MSE, C's input and
  the completed image D sees all use that mask; the local patch D sees of the completed
  image is centred on the hole (a free-form hole's bounding box, glcic_fast.training.data).
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
"""

import contextlib
import inspect
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glcic_fast import ops
from glcic_fast.devices import default_device
from glcic_fast.nn.completion_net import CompletionNet
from glcic_fast.nn.discriminator import ContextDiscriminator
from glcic_fast.training.config import TrainConfig
from glcic_fast.training.data import crop_squares, hole_mask
from glcic_fast.training.distributed import convert_sync_batchnorm, rank_and_world


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


class Trainer:
    """Both nets, both optimisers and the step; ``train_step`` runs one step of the phase
    the step is in. Used by ``train`` (the run loop, run.py) and directly by tests and
    benchmarks."""

    def __init__(self, config: TrainConfig, mean_pixel: Sequence[float], device=None):
        self.config = cfg = config
        self.world_size = rank_and_world()[1]
        self.device = default_device(device or cfg.device)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda"
                                         and cfg.precision == "float32")
        self.channels_last = self.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.mean_pixel = [float(v) for v in mean_pixel]
        self.dtype = torch.float64 if cfg.precision == "float64" else torch.float32

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        # Block order and output activation chosen: weights loaded later (a checkpoint's, or
        # --init's) cannot switch them.
        self.completion = CompletionNet(cfg.bn_after_relu, output_activation=cfg.output_activation,
                                        mean_pixel=self.mean_pixel)
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

            kw = {"device_ids": [self.device] if self.device.type == "cuda" else None}
            # Synchronised BatchNorm keeps the buffers equal: no broadcast before each forward.
            if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
                kw["forward_sync_buffers"] = False
            else:
                kw["broadcast_buffers"] = False
            self.c_forward = DDP(self.completion, **kw)
            self.d_pair = DDP(self.d_pair, **kw)
        self.step = 0
        self._last = None  # the last step's (x, mask, C's output), for sample_grid

    @property
    def phase(self) -> str:
        return self.config.phase(self.step)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def prepare_batch(self, batch: dict):
        """(x in [0, 1], hole mask, fake-patch corners, real-patch corners) on the device.
        The mask is the batch's own (free-form holes: drawn by the data workers), or built
        here from the rectangles' corners (rectangles only: nothing more to copy)."""
        dev, s = self.device, self.config.image_size
        x = batch["image"].to(dev, non_blocking=True).to(self.dtype).div_(255)
        x = x.contiguous(memory_format=self.memory_format)
        if "mask" in batch:
            mask = batch["mask"].to(dev, non_blocking=True).to(self.dtype)
        else:
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
        out = self.completion.output_to_image(out.to(self.dtype))
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
        if self._last is None:
            return None
        x, mask, out = (t[:n].float().cpu() for t in self._last)
        mean = torch.tensor(self.mean_pixel).view(1, 3, 1, 1)
        shown_input = x * (1 - mask) + mean * mask
        completed = x * (1 - mask) + out * mask
        rows = torch.cat([shown_input, completed, x], dim=3)  # n x 3 x S x 3S
        return torch.cat(list(rows), dim=1).clamp(0, 1)


def _to_cpu(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in state.items()}

