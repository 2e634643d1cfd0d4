"""What a run reports while it trains (rank 0 only): the losses in losses.csv and
TensorBoard, sample image grids, the progress bar and its messages."""

import csv
import logging
import os
import time
from typing import Dict, Optional

import torch

from glcic_fast.files import atomic_write
from glcic_fast.training.config import TrainConfig
from glcic_fast.training.run_folder import LOSSES_FILE, TENSORBOARD_DIR

log = logging.getLogger(__name__)

_CSV_FIELDS = ("step", "phase", "mse", "d_loss", "adv_loss", "d_real", "d_fake", "sec_per_step",
               "images_per_sec", "wall_time")


class RunLog:
    """Rank 0's outputs: losses.csv, TensorBoard scalars and image grids, the tqdm bar."""

    def __init__(self, cfg: TrainConfig, run_dir: str, step: int, enabled: bool):
        self.enabled, self.writer, self.bar = enabled, None, None
        if not enabled:
            return
        self.csv_path = os.path.join(run_dir, LOSSES_FILE)
        kept = []
        if os.path.exists(self.csv_path):  # drop rows after the checkpoint we resume from
            with open(self.csv_path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) <= step]

        def write(f):
            w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
            w.writeheader()
            w.writerows({k: row.get(k, "") for k in _CSV_FIELDS} for row in kept)
        atomic_write(self.csv_path, write, mode="w")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                log.warning("TensorBoard logging is off (%s); pip install 'glcic_fast[train]' or tensorboard", exc)
            else:
                self.writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=step or None)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.total_steps, initial=step, unit="step", dynamic_ncols=True, desc="train")

    def scalars(self, step: int, phase: str, values: Dict[str, float]):
        if not self.enabled:
            return
        row = {"step": step, "phase": phase, "wall_time": f"{time.time():.3f}"}
        row.update({k: f"{v:.6g}" for k, v in values.items()})
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=_CSV_FIELDS).writerow({k: row.get(k, "") for k in _CSV_FIELDS})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{'loss' if 'loss' in k or k == 'mse' else 'train'}/{k}", v, step)
        if self.bar is not None:
            shown = {k: f"{values[k]:.4g}" for k in ("mse", "d_loss", "adv_loss") if k in values}
            self.bar.set_postfix(phase=phase, **shown, refresh=False)

    def image(self, step: int, grid: Optional[torch.Tensor]):
        if self.enabled and self.writer is not None and grid is not None:
            self.writer.add_image("samples/input_completion_truth", grid, step)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def write(self, message: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
