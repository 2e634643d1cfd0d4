"""The run folder: the names of the files a run keeps there, and what a session does with
it before training: decide whether it starts a new run or resumes the run there (rank 0
decides, once; every process reads the checkpoint it resumes from, once), then the image
list and the run's config.json."""

import contextlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

from glcic_fast.files import TMP_NAME, atomic_write
from glcic_fast.nn.completion_net import default_input_convention
from glcic_fast.training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from glcic_fast.training.config import TrainConfig, TrainingError
from glcic_fast.training.data import list_images
from glcic_fast.training.distributed import broadcast_object, is_distributed, rank_and_world

CONFIG_FILE = "config.json"
IMAGES_FILE = "images.txt"
LOSSES_FILE = "losses.csv"
WEIGHTS_FILE = "completionnet.safetensors"
TENSORBOARD_DIR = "tensorboard"
#: Files and folders a run creates in its folder, besides its checkpoints (checkpoints.py
#: names those); anything else there is the user's.
RUN_FILES = (CONFIG_FILE, IMAGES_FILE, LOSSES_FILE, WEIGHTS_FILE, TENSORBOARD_DIR)


@dataclass
class RunStart:
    """Where a session starts: a new run (no checkpoint), or the run in the folder."""
    #: The checkpoint resumed from (its path) and its contents; None for a new run.
    checkpoint: Optional[str] = None
    state: Optional[dict] = None
    #: The run's settings: its checkpoint's, or config.json's for a run stopped before its
    #: first checkpoint; None for a run that has none yet.
    saved_config: Optional[dict] = None

    @property
    def step(self) -> int:
        return int(self.state["step"]) if self.state is not None else 0


def open_run(run_dir: str, resume: bool) -> RunStart:
    """Rank 0 decides whether the session starts a new run in ``run_dir`` or resumes the
    one there, and reads the checkpoint it resumes from; every process learns the decision
    (or the error) and the others read that checkpoint themselves (no broadcast of
    hundreds of megabytes)."""
    start, decision = None, None
    if rank_and_world()[0] == 0:
        try:
            start = _look_at(run_dir, resume)
            decision = ("ok", start.checkpoint, start.saved_config)
        except TrainingError as exc:
            decision = ("error", str(exc), None)
    decision = broadcast_object(decision)
    if decision[0] == "error":
        raise TrainingError(decision[1])
    if start is None:
        _, path, saved = decision
        start = RunStart(path, load_checkpoint(path) if path is not None else None, saved)
    return start


def _look_at(run_dir: str, resume: bool) -> RunStart:
    """Rank 0's decision: a new run, or the run in ``run_dir`` from its newest readable
    checkpoint; a folder that holds anything else is refused."""
    entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise TrainingError(f"--out {run_dir} exists and is not a folder")
    if entries and not resume:
        raise TrainingError(f"the run folder {run_dir} is not empty; pass --resume to continue the run in it, "
                            "or choose a new --out (nothing there is deleted or overwritten)")
    found = latest_checkpoint(run_dir) if entries else None
    if found is not None:
        path, state = found
        return RunStart(path, state, state["config"])
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
                return RunStart(saved_config=json.load(f)["config"])
    return RunStart()


def prepare_folder(run_dir: str, data: str) -> List[str]:
    """The run's image list (paths relative to ``data``). Rank 0 makes the folder, removes
    the temporary files of a save that was killed and, at the run's start, lists the images
    into images.txt; every process then reads that list: a run keeps its images."""
    images_path = os.path.join(run_dir, IMAGES_FILE)
    if rank_and_world()[0] == 0:
        os.makedirs(run_dir, exist_ok=True)
        for name in os.listdir(run_dir):
            if TMP_NAME.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(run_dir, name))
        if not os.path.exists(images_path):
            files = list_images(data)
            atomic_write(images_path, lambda f: f.write("".join(n + "\n" for n in files)), mode="w")
    if is_distributed():
        dist.barrier()
    with open(images_path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def write_config_file(cfg: TrainConfig, record: dict, num_images: int, files_digest: str, world_size: int):
    """config.json, written at the run's start: its settings and what glcic_fast.load needs
    to read the completion net's weights file."""
    mean = record["mean_pixel"]
    content = {"config": record, "mean_pixel": mean, "mpv": mean, "num_images": num_images,
               "files_digest": files_digest, "world_size": world_size,
               "completion_net": {"bn_after_relu": cfg.bn_after_relu, "output_activation": cfg.output_activation,
                                  "input_convention": default_input_convention(cfg.bn_after_relu,
                                                                               cfg.output_activation)}}
    atomic_write(os.path.join(cfg.out, CONFIG_FILE), lambda f: f.write(json.dumps(content, indent=2) + "\n"),
                 mode="w")
