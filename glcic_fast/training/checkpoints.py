"""Checkpoints: written atomically, rotated, listed, loaded (the newest readable one), and
each process's random states that they hold for an exact resume."""

import contextlib
import logging
import os
import random
import re
from typing import List, Optional, Tuple

import numpy as np
import torch

from glcic_fast.files import atomic_write
from glcic_fast.training.config import TrainingError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "glcic_fast-train"
CHECKPOINT_VERSION = 1

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{9,})\.pt$")


# -- random states -------------------------------------------------------------------------------

def capture_rng(device: torch.device) -> dict:
    """This process's random states, in types ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device):
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- checkpoints -------------------------------------------------------------------------------------

def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step:09d}.pt")


def list_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of the run's checkpoints, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
             if (m := _CHECKPOINT_RE.match(name))]
    return sorted(found)


def save_checkpoint(state: dict, run_dir: str, keep: int) -> str:
    """Write ``state`` (stamped with this format and version) as checkpoint-<step>.pt
    atomically, then delete all but the newest ``keep`` checkpoints (only files named
    checkpoint-<step>.pt)."""
    state = dict(state, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    path = checkpoint_path(run_dir, state["step"])
    atomic_write(path, lambda f: torch.save(state, f))
    for _, old in list_checkpoints(run_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    return path


def load_checkpoint(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a glcic_fast training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is checkpoint version {state.get('version')}; this glcic_fast reads "
                            f"version {CHECKPOINT_VERSION}")
    return state


def latest_checkpoint(run_dir: str) -> Optional[Tuple[str, dict]]:
    """The newest checkpoint that loads; unreadable newer ones are reported and skipped."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # a damaged file must not end a days-long run
            log.warning("skipping unreadable checkpoint %s: %s: %s", path, type(exc).__name__, exc)
    return None

