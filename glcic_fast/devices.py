"""Which device and dtype to run on: one answer for the API, the command line and training;
and how CPU tensors are backed by memory (``use_huge_pages_for_cpu_tensors``)."""

import os
from typing import Tuple

import torch

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def parse_dtype(dtype) -> torch.dtype:
    """torch.float32 / float16 / bfloat16 from a torch.dtype or a name ("fp16", "bf16", ...);
    None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().replace("torch.", "")]
    raise ValueError(f"dtype must be float32, float16 or bfloat16 (or fp32, fp16, bf16), got {dtype!r}")


def torchrun_ranks() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it.
    Read before any process group exists (training's ``rank_and_world`` asks the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def default_device(device=None) -> torch.device:
    """``device`` when given, else CUDA when available, else the CPU. A CUDA device without
    an index is made specific: this process's GPU under torchrun (cuda:LOCAL_RANK), else
    the current CUDA device, so that tensors' devices compare equal to it."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda" or device.index is not None:
            return device
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    _, world, local = torchrun_ranks()
    if world > 1 or "LOCAL_RANK" in os.environ:
        return torch.device("cuda", local)
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)


#: PyTorch's switch for backing CPU tensors of 2 MB and more with transparent huge pages.
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages_for_cpu_tensors():
    """Turn on PyTorch's transparent huge pages for large CPU tensors, unless the environment
    already says (``THP_MEM_ALLOC_ENABLE=0`` keeps PyTorch's default).

    A forward pass allocates each layer's output afresh, and the kernel maps fresh memory a
    page at a time on first touch: with 4 KB pages that was about a fifth of a warm CPU
    forward at 512 x 512, while a process's first forward is slower with huge pages (README,
    Performance). PyTorch reads the variable when it first allocates a large tensor, so
    this works when called before that (glcic_fast calls it on import); PyTorch then asks
    the kernel (madvise) to back large CPU tensors with 2 MB pages."""
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
