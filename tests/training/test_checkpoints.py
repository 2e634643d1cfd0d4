"""Checkpoint files: atomic writes, rotation that deletes only old checkpoints, damaged
ones skipped."""

import os

import pytest
import torch

from glcic_fast.training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _dummy_state(step):
    return {"format": "glcic_fast-train", "version": 1, "step": step, "weights": torch.full((1000,), float(step))}


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    run = str(tmp_path)
    first = save_checkpoint(_dummy_state(1), run, keep=3)
    good = open(first, "rb").read()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"\x80\x02 half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_dummy_state(2), run, keep=3)
    monkeypatch.undo()
    assert sorted(os.listdir(run)) == ["checkpoint-000000001.pt"]  # no temporary file, no step 2
    assert open(first, "rb").read() == good
    path, state = latest_checkpoint(run)
    assert path == first and torch.equal(state["weights"], torch.ones(1000))

    # Overwriting the same step is atomic too: a failed rewrite keeps the old file.
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        save_checkpoint(_dummy_state(1), run, keep=3)
    monkeypatch.undo()
    assert open(first, "rb").read() == good


def test_keep_deletes_only_old_checkpoints_and_damaged_ones_are_skipped(tmp_path):
    run = str(tmp_path)
    (tmp_path / "checkpoint-notes.txt").write_text("mine")
    (tmp_path / "checkpoint-best.pt").write_bytes(b"user file")
    for step in (1, 2, 3, 4):
        save_checkpoint(_dummy_state(step), run, keep=2)
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]
    assert (tmp_path / "checkpoint-notes.txt").read_text() == "mine"
    assert (tmp_path / "checkpoint-best.pt").read_bytes() == b"user file"
    # A damaged newest checkpoint (say, disk corruption) falls back to the previous one.
    with open(os.path.join(run, "checkpoint-000000004.pt"), "r+b") as f:
        f.truncate(100)
    path, state = latest_checkpoint(run)
    assert state["step"] == 3
    with pytest.raises(Exception):
        load_checkpoint(os.path.join(run, "checkpoint-000000004.pt"))
