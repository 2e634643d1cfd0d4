"""Several processes (torchrun): the process group, who this process is in it, BatchNorm
synchronised over it (on GPUs and on CPUs) and broadcasting a Python object from one process."""

import contextlib
from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn

from glcic_fast.devices import default_device, torchrun_ranks


@contextlib.contextmanager
def process_group(device=None):
    """Under torchrun (several processes) and without a process group yet: set one up from
    torchrun's environment for the time of the block (NCCL when ``device``, as
    ``default_device`` completes it, is a GPU, which becomes this process's current one;
    gloo otherwise) and destroy it after. Otherwise nothing."""
    owns = torchrun_ranks()[1] > 1 and not dist.is_initialized()
    if owns:
        device = default_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owns:
            dist.destroy_process_group()


def rank_and_world() -> Tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_and_world()[1] > 1


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch over all
    processes, for CPU tensors (torch.nn.SyncBatchNorm takes GPU tensors only). Same
    parameters, buffers and state-dict keys as BatchNorm2d; without a process group of
    more than one process it *is* BatchNorm2d. Gradients flow through the all-reduces
    (``_AllReduceSum``), as through SyncBatchNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed():
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        dims = (0, 2, 3)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), count]))
        total = stats[-1]
        mean = stats[:-1] / total
        centered = xf - mean.view(1, -1, 1, 1)
        var = all_reduce(centered.square().sum(dims)) / total
        y = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``module`` synchronised over the process group (in place)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = GlooSyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return module


def broadcast_object(obj, src: int = 0):
    """``obj`` as process ``src`` has it, in every process (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
