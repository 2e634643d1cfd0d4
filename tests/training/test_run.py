"""Training runs: the command line's runs (uninterrupted, killed and resumed, for each kind
of hole; two-process DDP; started together in a module fixture so that they overlap), the
run folder's rules, resuming, stopping on a signal, the command line's options."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from glcic_fast import load
from glcic_fast.cli import build_parser
from glcic_fast.cli.train import config_from_args
from glcic_fast.training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from glcic_fast.training.config import TrainConfig, TrainingError
from glcic_fast.training.run import train
from glcic_fast.training.trainer import Trainer

import helpers

REPO = helpers.REPO
#: The command-line runs: 2 + 2 + 3 steps, global batch 2.
CLI_STEPS, CLI_BATCH = (2, 2, 3), 2
CLI_ARGS = ["--phase-steps", *map(str, CLI_STEPS), "--batch-size", str(CLI_BATCH), "--image-size", "32",
            "--local-size", "16", "--hole-range", "8", "12", "--disc-channels", "8", "16", "16", "16", "16", "16",
            "--device", "cpu", "--checkpoint-every", "2", "--keep", "2", "--seed", "3", "--workers", "0",
            "--log-every", "1", "--image-every", "2", "--no-progress"]


# -- command-line runs, started together ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(data, out, *extra, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "glcic_fast.cli", "train", data, "--out", out, *CLI_ARGS, *extra]
    log = open(out + ".log", "ab")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _wait(proc, timeout=300):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _log_of(out):
    with open(out + ".log", errors="replace") as f:
        return f.read()[-4000:]


def _kill_after_checkpoint(proc, out, step, report):
    """SIGKILL ``proc`` as soon as checkpoint ``step`` exists (runs in a thread)."""
    path = os.path.join(out, f"checkpoint-{step:09d}.pt")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(path):
            proc.send_signal(signal.SIGKILL)
            report["killed"] = True
            break
        time.sleep(0.01)
    proc.wait()


HOLES = ("rect", "free", "mixed")


@pytest.fixture(scope="module")
def cli_runs(photos, tmp_path_factory):
    """For each kind of hole an uninterrupted run and a run killed once its step-4
    checkpoint exists; a float64 run with 1 and with 2 processes (DDP); all started now."""
    import threading

    base = tmp_path_factory.mktemp("runs")
    names = [f"{kind}-{holes}" for holes in HOLES for kind in ("reference", "killed")] + ["reference64", "ddp64"]
    runs = {name: str(base / name) for name in names}
    port = _free_port()
    procs = {name: _cli(photos, runs[name], "--holes", name.split("-")[1]) for name in names[:2 * len(HOLES)]}
    procs["reference64"] = _cli(photos, runs["reference64"], "--precision", "float64")
    watchers = []
    for holes in HOLES:
        name, report = f"killed-{holes}", {"killed": False}
        watcher = threading.Thread(target=_kill_after_checkpoint, args=(procs[name], runs[name], 4, report))
        watcher.start()
        procs[f"kill_report-{holes}"], procs[f"watcher-{holes}"] = report, watcher
        watchers.append(watcher)
    # The same global batch: each of the 2 processes takes half.
    procs["ddp64"] = [_cli(photos, runs["ddp64"], "--precision", "float64", env_extra={
        "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    yield runs, procs
    for p in [*(procs[name] for name in names[:-1]), *procs["ddp64"]]:
        if p.poll() is None:
            p.kill()
            p.wait()
    for watcher in watchers:
        watcher.join()


def _final(run_dir):
    path, state = latest_checkpoint(run_dir)
    assert state["step"] == sum(CLI_STEPS), path
    return state


def _assert_states_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_uninterrupted_run_writes_everything(cli_runs):
    runs, procs = cli_runs
    out = runs["reference-rect"]
    assert _wait(procs["reference-rect"]) == 0, _log_of(out)
    state = _final(out)
    assert state["phase"] == "joint" and state["data"]["samples_seen"] == sum(CLI_STEPS) * CLI_BATCH
    assert [s for s, _ in list_checkpoints(out)] == [6, 7]  # --keep 2
    with open(os.path.join(out, "losses.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert [r["phase"] for r in rows] == ["completion"] * 2 + ["discriminator"] * 2 + ["joint"] * 3
    for r in rows:
        assert np.isfinite(float(r["mse"]))
        if r["phase"] != "completion":
            assert np.isfinite(float(r["d_loss"]))
    assert all(r["adv_loss"] for r in rows[4:])
    # The completion net, exported for glcic_fast.load, with the run's mean pixel.
    net = load(os.path.join(out, "completionnet.safetensors"))
    assert np.allclose(net.mean_pixel.tolist(), state["mean_pixel"])
    _assert_states_equal(net.state_dict(), state["completion"], "exported weights")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert any(n.startswith("events.") for n in os.listdir(os.path.join(out, "tensorboard")))


@pytest.mark.parametrize("holes", HOLES)
def test_killed_and_resumed_run_is_bit_identical(cli_runs, photos, holes):
    """Killed after its step-4 checkpoint and resumed (with data-loader workers, which
    draw the free-form masks), a run ends exactly as the uninterrupted one."""
    runs, procs = cli_runs
    reference = f"reference-{holes}"
    out, victim = runs[f"killed-{holes}"], procs[f"killed-{holes}"]
    procs[f"watcher-{holes}"].join()
    assert procs[f"kill_report-{holes}"]["killed"], f"the run ended before the kill: nothing tested\n{_log_of(out)}"
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(s for s, _ in list_checkpoints(out))
    assert killed_at < sum(CLI_STEPS)
    # The run's own settings (--holes included) come from its checkpoint; the data do not
    # depend on the workers.
    resumed = _cli(photos, out, "--resume", "--workers", "2")
    assert _wait(resumed) == 0, _log_of(out)
    assert "resumed from" in _log_of(out)
    assert _wait(procs[reference]) == 0, _log_of(runs[reference])
    a, b = _final(runs[reference]), _final(out)
    assert a["config"]["holes"] == b["config"]["holes"] == holes
    for key in ("completion", "discriminator"):
        _assert_states_equal(a[key], b[key], key)
    for key in ("opt_c", "opt_d"):
        for pa, pb in zip(a[key]["state"].values(), b[key]["state"].values()):
            for name in pa:
                assert torch.equal(torch.as_tensor(pa[name]), torch.as_tensor(pb[name])), f"{key}.{name}"
    for name in ("torch", "python", "numpy"):  # random states continue as if never stopped
        ra, rb = a["rng"][0][name], b["rng"][0][name]
        if isinstance(ra, dict):
            assert all(torch.equal(ra[k], rb[k]) if torch.is_tensor(ra[k]) else ra[k] == rb[k] for k in ra), name
        else:
            assert torch.equal(ra, rb), name
    # The loss log was cut back to the checkpoint and continued: each step once.
    with open(os.path.join(out, "losses.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 8))


def test_two_process_ddp_matches_one_process(cli_runs):
    """With BatchNorm synchronised over processes and every loss normalised by global
    counts, 2 processes with half the batch each compute what 1 process computes on the
    whole batch; only the order of floating-point sums differs. The runs are in float64:
    in float32 this deep BatchNorm net at batch 2 turns rounding into ~1e-3 relative
    gradient differences (a single process in float32 against float64 differs as much),
    which would hide a real mismatch."""
    runs, procs = cli_runs
    codes = [_wait(p) for p in procs["ddp64"]]
    assert codes == [0, 0], _log_of(runs["ddp64"])
    assert _wait(procs["reference64"]) == 0, _log_of(runs["reference64"])
    one, two = _final(runs["reference64"]), _final(runs["ddp64"])
    assert two["data"]["world_size"] == 2 and one["data"]["world_size"] == 1
    assert len(two["rng"]) == 2 and one["mean_pixel"] == pytest.approx(two["mean_pixel"], abs=1e-12)
    for key in ("completion", "discriminator"):
        for name, t in one[key].items():
            assert t.dtype == (torch.float64 if t.is_floating_point() else torch.int64)
            if t.is_floating_point():
                torch.testing.assert_close(two[key][name], t, rtol=1e-6, atol=1e-8, msg=f"{key}.{name}")
            else:
                assert torch.equal(two[key][name], t), name
    # The logged losses are global means in both.
    rows = []
    for run in (runs["reference64"], runs["ddp64"]):
        with open(os.path.join(run, "losses.csv")) as f:
            rows.append(list(csv.DictReader(f)))
    for a, b in zip(*rows):
        for k in ("mse", "d_loss", "adv_loss", "d_real", "d_fake"):
            if a[k]:
                assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5), (a["step"], k)


# -- the run folder, resuming, stopping -------------------------------------------------------------

def test_refuses_to_start_in_a_non_empty_folder(photos, tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "thesis.tex").write_text("precious")
    with pytest.raises(TrainingError, match="not empty"):
        train(tiny_config(photos, run))
    with pytest.raises(TrainingError, match="holds no glcic_fast run"):
        train(tiny_config(photos, run), resume=True)
    assert os.listdir(run) == ["thesis.tex"] and (run / "thesis.tex").read_text() == "precious"
    args = build_parser().parse_args(["train", photos, "--out", str(run), "--device", "cpu", "--no-progress"])
    assert args.func(args) == 1
    # A run stopped before its first checkpoint (only its own files there) starts again.
    early = tmp_path / "early"
    early.mkdir()
    (early / "images.txt").write_text("astronaut.jpg\nchelsea.webp\n")
    with pytest.raises(TrainingError, match="not empty"):
        train(tiny_config(photos, early, phase_steps=(1, 0, 0)))
    summary = train(tiny_config(photos, early, phase_steps=(1, 0, 0)), resume=True)
    assert summary["step"] == 1 and (early / "images.txt").read_text() == "astronaut.jpg\nchelsea.webp\n"


def test_resume_refuses_other_settings_and_extends(photos, tiny_config, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(photos, run, phase_steps=(1, 0, 0), mean_pixel=(0.5, 0.5, 0.5)))
    assert summary["step"] == 1 and not summary["interrupted"]
    with pytest.raises(TrainingError, match="batch_size"):
        train(tiny_config(photos, run, phase_steps=(1, 0, 0), batch_size=4), resume=True)
    with pytest.raises(TrainingError, match="phase_steps"):
        train(tiny_config(photos, run, phase_steps=(0, 1, 0)), resume=True)
    # A longer schedule continues the same run.
    summary = train(tiny_config(photos, run, phase_steps=(1, 1, 0)), resume=True)
    assert summary["step"] == 2
    assert load_checkpoint(summary["checkpoint"])["phase"] == "discriminator"


def test_sigterm_saves_a_checkpoint_and_stops(photos, tiny_config, tmp_path, monkeypatch):
    """A polite stop (SIGTERM from a scheduler, Ctrl-C) ends the step, checkpoints it and
    returns; --resume then goes on from there."""
    import signal as signals

    run = tmp_path / "run"
    cfg = tiny_config(photos, run, phase_steps=(3, 0, 0), checkpoint_every=100, mean_pixel=(0.5, 0.5, 0.5))
    real_step = Trainer.train_step

    def step_then_signal(self, batch):
        metrics = real_step(self, batch)
        if self.step == 1:
            signals.raise_signal(signals.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    summary = train(cfg)
    assert summary["interrupted"] and summary["step"] == 1 and summary["signal"] == signals.SIGTERM
    assert [s for s, _ in list_checkpoints(str(run))] == [1]
    assert signals.getsignal(signals.SIGTERM) is signals.SIG_DFL or callable(signals.getsignal(signals.SIGTERM))
    monkeypatch.undo()
    assert train(cfg, resume=True)["step"] == 3
    assert [s for s, _ in list_checkpoints(str(run))] == [1, 3]


def test_sigterm_to_the_process_group_checkpoints_with_loader_workers(photos, tmp_path):
    """``timeout``, Ctrl-C and schedulers signal the whole process group, the data-loader
    workers included: the trainer must still write its checkpoint and exit 128 + 15
    rather than crash on a dead worker."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "glcic_fast.cli", "train", photos, "--out", out, *CLI_ARGS,
           "--phase-steps", "1000", "0", "0", "--workers", "1", "--checkpoint-every", "1000", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    with open(out + ".log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        losses = os.path.join(out, "losses.csv")
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(losses) and sum(1 for _ in open(losses)) >= 3:  # header + 2 logged steps
                break
            time.sleep(0.05)
        assert proc.poll() is None, _log_of(out)
        os.killpg(proc.pid, signal.SIGTERM)
        assert _wait(proc) == 128 + signal.SIGTERM, _log_of(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    steps = [s for s, _ in list_checkpoints(out)]
    assert len(steps) == 1 and 2 <= steps[0] < 1000, (steps, _log_of(out))
    assert "stopped by signal" in _log_of(out)


def test_cli_options_reach_the_config(photos, tmp_path):
    out = str(tmp_path / "run")
    args = build_parser().parse_args(["train", photos, "--out", out, "--phase-steps", "5", "6", "7",
                                      "--batch-size", "8", "--image-size", "64", "--local-size", "32",
                                      "--hole-range", "16", "24", "--device", "cpu", "--checkpoint-every", "9",
                                      "--keep", "4", "--seed", "11", "--workers", "2"])
    cfg = config_from_args(args)
    assert (cfg.phase_steps, cfg.batch_size, cfg.image_size, cfg.local_size, cfg.hole_range) == \
        ((5, 6, 7), 8, 64, 32, (16, 24))
    assert (cfg.device, cfg.checkpoint_every, cfg.keep, cfg.seed, cfg.workers) == ("cpu", 9, 4, 11, 2)
    assert cfg.alpha == 0.0004 and cfg.total_steps == 18 and not args.resume
    defaults = config_from_args(build_parser().parse_args(["train", photos, "--out", out]))
    assert (defaults.phase_steps, defaults.batch_size, defaults.image_size, defaults.local_size,
            defaults.hole_range) == ((90000, 10000, 400000), 96, 256, 128, (96, 128))


def test_cli_resume_takes_the_runs_settings_but_not_the_sessions(photos, tmp_path):
    """--resume: the settings not given are the run's (its checkpoint's), but for the
    session's own (device, workers, progress, TensorBoard); a run-defining one given
    differently is refused."""
    out = str(tmp_path / "run")
    args = build_parser().parse_args(["train", photos, "--out", out, *CLI_ARGS, "--phase-steps", "1", "0", "0",
                                      "--checkpoint-every", "1", "--no-tensorboard"])
    assert args.func(args) == 0
    args = build_parser().parse_args(["train", photos, "--out", out, "--resume", "--phase-steps", "1", "1", "0",
                                      "--device", "cpu", "--workers", "0", "--no-progress"])
    assert args.func(args) == 0
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]  # the run's --checkpoint-every 1
    _, state = latest_checkpoint(out)
    saved = state["config"]
    assert (saved["phase_steps"], saved["batch_size"], saved["image_size"], saved["seed"], saved["keep"]) == \
        ((1, 1, 0), CLI_BATCH, 32, 3, 2)
    assert saved["tensorboard"]  # a session's setting: the default, not the run's
    args = build_parser().parse_args(["train", photos, "--out", out, "--resume", "--batch-size", "4",
                                      "--device", "cpu", "--no-progress"])
    assert args.func(args) == 1


def test_cli_hole_and_init_options_reach_the_config(photos, tmp_path):
    out = str(tmp_path / "run")
    args = build_parser().parse_args(["train", photos, "--out", out, "--holes", "mixed", "--free-probability", "0.3",
                                      "--stroke-count", "2", "3", "--stroke-vertices", "5", "6",
                                      "--stroke-width", "0.02", "0.04", "--stroke-length", "0.1", "0.2",
                                      "--blob-count", "1", "2", "--blob-size", "0.05", "0.1",
                                      "--free-area", "0.1", "0.3", "--init", "weights.t7",
                                      "--output-activation", "hardtanh"])
    cfg = config_from_args(args)
    assert (cfg.holes, cfg.free_probability, cfg.stroke_count, cfg.stroke_vertices, cfg.stroke_width,
            cfg.stroke_length, cfg.blob_count, cfg.blob_size, cfg.free_area) == \
        ("mixed", 0.3, (2, 3), (5, 6), (0.02, 0.04), (0.1, 0.2), (1, 2), (0.05, 0.1), (0.1, 0.3))
    assert cfg.init == os.path.abspath("weights.t7") and cfg.output_activation == "hardtanh"
    free_form = cfg.augmentation().free_form
    assert (free_form.stroke_count, free_form.blob_size, free_form.area) == ((2, 3), (0.05, 0.1), (0.1, 0.3))
    # The defaults the help text states are the config's.
    import argparse
    import dataclasses

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in commands.choices["train"]._actions}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in ("stroke_count", "stroke_vertices", "stroke_width", "stroke_length", "blob_count", "blob_size",
                 "free_area"):
        assert "(default {:g} {:g})".format(*defaults[name]) in helps[name], name
    assert f"(default {defaults['free_probability']:g})" in helps["free_probability"]
    bad = build_parser().parse_args(["train", photos, "--out", out, "--holes", "free", "--free-area", "0.2", "0.21",
                                     "--device", "cpu", "--no-progress"])
    assert bad.func(bad) == 1 and not os.path.exists(out)
