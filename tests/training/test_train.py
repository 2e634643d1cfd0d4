"""Training: discriminator, data pipeline, phases, checkpoints, exact resume, DDP.

Everything runs on the CPU with tiny images (32 x 32 crops, 16 x 16 local patches, holes
of 8-12 px) cut from real photographs (scikit-image's samples written as jpg, png and
webp). The command-line runs (uninterrupted, killed and resumed, two-process DDP) start
together in a module fixture so that they overlap.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glcic_fast import load
from glcic_fast.training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from glcic_fast.cli import build_parser
from glcic_fast.training.data import (Augmentation, ImageFolder, StepBatchSampler, compute_mean_pixel, crop_squares,
                             epoch_permutation, hole_mask, list_images)
from glcic_fast.nn.discriminator import ContextDiscriminator, default_conv_count, load_discriminator
from glcic_fast.training.train import Trainer, TrainConfig, TrainingError, frozen, train
from glcic_fast.cli.train import config_from_args

import helpers

REPO = helpers.REPO
TINY = dict(image_size=32, local_size=16, hole_range=(8, 12), disc_channels=(8, 16, 16, 16, 16, 16))
#: The command-line runs: 2 + 2 + 3 steps, global batch 2.
CLI_STEPS, CLI_BATCH = (2, 2, 3), 2
CLI_ARGS = ["--phase-steps", *map(str, CLI_STEPS), "--batch-size", str(CLI_BATCH), "--image-size", "32",
            "--local-size", "16", "--hole-range", "8", "12", "--disc-channels", "8", "16", "16", "16", "16", "16",
            "--device", "cpu", "--checkpoint-every", "2", "--keep", "2", "--seed", "3", "--workers", "0",
            "--log-every", "1", "--image-every", "2", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads that wait for each other
    make these tiny steps 10-30 times slower (the subprocesses get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- photographs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small data set of real photos, nested, in jpg, png and webp (plus files to ignore)."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    (root / "nested" / "deeper").mkdir(parents=True)
    names = {"astronaut": "astronaut.jpg", "coffee": "nested/coffee.png", "chelsea": "chelsea.webp",
             "rocket": "nested/deeper/rocket.JPG", "camera": "camera.png", "immunohistochemistry": "ihc.jpeg"}
    for name, rel in names.items():
        image = getattr(skimage.data, name)()
        h, w = image.shape[:2]
        scale = 64 / min(h, w)  # small files: the augmentation rescales to 32-48 anyway
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        if image.ndim == 3:
            image = image[:, :, ::-1]
        assert cv2.imwrite(str(root / rel), image)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    return str(root)


def tiny_config(data, out, **overrides) -> TrainConfig:
    kw = dict(TINY, phase_steps=(2, 2, 2), batch_size=2, device="cpu", workers=0, checkpoint_every=1, keep=2,
              log_every=1, tensorboard=False, progress=False, seed=0)
    kw.update(overrides)
    return TrainConfig(str(data), str(out), **kw)


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


@pytest.fixture(scope="module")
def cli_runs(photos, tmp_path_factory):
    """An uninterrupted run, a run killed once its step-4 checkpoint exists, and a float64
    run with 1 and with 2 processes (DDP), all started now."""
    import threading

    base = tmp_path_factory.mktemp("runs")
    runs = {name: str(base / name) for name in ("reference", "killed", "reference64", "ddp64")}
    port = _free_port()
    procs = {"reference": _cli(photos, runs["reference"]), "killed": _cli(photos, runs["killed"]),
             "reference64": _cli(photos, runs["reference64"], "--precision", "float64")}
    report = {"killed": False}
    watcher = threading.Thread(target=_kill_after_checkpoint, args=(procs["killed"], runs["killed"], 4, report))
    watcher.start()
    procs["kill_report"], procs["watcher"] = report, watcher
    # The same global batch: each of the 2 processes takes half.
    procs["ddp64"] = [_cli(photos, runs["ddp64"], "--precision", "float64", env_extra={
        "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    yield runs, procs
    for p in [procs["reference"], procs["killed"], procs["reference64"], *procs["ddp64"]]:
        if p.poll() is None:
            p.kill()
            p.wait()
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
    out = runs["reference"]
    assert _wait(procs["reference"]) == 0, _log_of(out)
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


def test_killed_and_resumed_run_is_bit_identical(cli_runs, photos):
    runs, procs = cli_runs
    out, victim = runs["killed"], procs["killed"]
    procs["watcher"].join()
    assert procs["kill_report"]["killed"], f"the run ended before the kill: nothing tested\n{_log_of(out)}"
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(s for s, _ in list_checkpoints(out))
    assert killed_at < sum(CLI_STEPS)
    resumed = _cli(photos, out, "--resume", "--workers", "2")  # data do not depend on the workers
    assert _wait(resumed) == 0, _log_of(out)
    assert "resumed from" in _log_of(out)
    assert _wait(procs["reference"]) == 0, _log_of(runs["reference"])
    a, b = _final(runs["reference"]), _final(out)
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


# -- discriminator ------------------------------------------------------------------------------------

def test_discriminator_conv_counts_follow_paper_and_glcic_pytorch():
    assert [default_conv_count(s, 6) for s in (256, 160, 32)] == [6, 5, 5]
    assert [default_conv_count(s, 5) for s in (128, 96, 16)] == [5, 5, 4]
    d = ContextDiscriminator()
    assert d.model_ld.n_convs == 5 and d.model_gd.n_convs == 6
    assert hasattr(d.model_ld, "linear6") and hasattr(d.model_gd, "linear7")
    celeba = ContextDiscriminator(96, 160, True)
    assert celeba.model_gd.n_convs == 5 and hasattr(celeba.model_gd, "linear6")


def test_discriminator_returns_logits():
    torch.manual_seed(0)
    d = ContextDiscriminator(16, 32, channels=(8, 16, 16, 16, 16)).eval()
    local, whole = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        d.linear1.bias.fill_(50.0)  # a confident D: sigmoid rounds to 1, the logit does not
        logit = d(local, whole)
        assert logit.shape == (3, 1)
        assert torch.equal(d.probability(local, whole), torch.sigmoid(logit))
    loss = F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit))
    assert torch.isfinite(loss) and loss > 40
    with pytest.raises(ValueError, match="N x 3 x 16 x 16"):
        d(torch.rand(1, 3, 17, 16), whole[:1])


class _GlcicPytorchTrunk(nn.Module):
    """GLCIC-PyTorch's Local/GlobalDiscriminator as its models.py lays it out (written here
    from the key names and block order in SPEC.md 6b): conv{i} -> act{i} -> bn{i}, then
    flatten, linear{n+1}, ReLU."""

    def __init__(self, size, n):
        super().__init__()
        channels = (64, 128, 256, 512, 512, 512)[:n]
        cin = 3
        for i, c in enumerate(channels, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, c, 5, 2, 2))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
            setattr(self, f"act{i}", nn.ReLU())
            cin = c
        self.n = n
        setattr(self, f"linear{n + 1}", nn.Linear(512 * (size // 2 ** n) ** 2, 1024))

    def forward(self, x):
        for i in range(1, self.n + 1):
            x = getattr(self, f"bn{i}")(getattr(self, f"act{i}")(getattr(self, f"conv{i}")(x)))
        return F.relu(getattr(self, f"linear{self.n + 1}")(x.flatten(1)))


class _GlcicPytorchContext(nn.Module):
    def __init__(self, local_size, global_size, global_convs):
        super().__init__()
        self.model_ld = _GlcicPytorchTrunk(local_size, 5)
        self.model_gd = _GlcicPytorchTrunk(global_size, global_convs)
        self.linear1 = nn.Linear(2048, 1)

    def forward(self, local, whole):
        return torch.sigmoid(self.linear1(torch.cat([self.model_ld(local), self.model_gd(whole)], 1)))


@pytest.mark.parametrize("arch", [("places2", 128, 256, 6), ("celeba", 96, 160, 5)], ids=lambda a: a[0])
def test_discriminator_loads_glcic_pytorch_checkpoint(arch, tmp_path):
    _, local_size, global_size, global_convs = arch
    torch.manual_seed(1)
    theirs = _GlcicPytorchContext(local_size, global_size, global_convs)
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong block order shows
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    theirs.eval()
    path = tmp_path / "model_cd_step1000"
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, path)  # nn.DataParallel save
    ours = load_discriminator(path).eval()
    assert (ours.local_size, ours.global_size, ours.model_gd.n_convs) == (local_size, global_size, global_convs)
    local, whole = torch.rand(2, 3, local_size, local_size), torch.rand(2, 3, global_size, global_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.probability(local, whole), theirs(local, whole), rtol=1e-5, atol=1e-6)
    # The same state dict also loads straight into a ContextDiscriminator of that shape.
    again = ContextDiscriminator(local_size, global_size, True)
    again.load_state_dict(torch.load(path, weights_only=True))


# -- data -----------------------------------------------------------------------------------------------

def test_image_listing_is_recursive_and_sorted(photos):
    files = list_images(photos)
    assert files == sorted(files) and len(files) == 6
    assert {os.path.splitext(f)[1].lower() for f in files} == {".jpg", ".jpeg", ".png", ".webp"}
    assert "nested/deeper/rocket.JPG" in files and "notes.txt" not in files and ".hidden.jpg" not in files


def test_augmentation_geometry_and_determinism(photos):
    aug = Augmentation(32, 16, (8, 12))
    assert aug.scale_range == (32, 48) and Augmentation().scale_range == (256, 384)
    ds = ImageFolder(photos, aug, seed=5)
    seen_sizes = set()
    for epoch in range(3):
        for index in range(len(ds)):
            s = ds[(epoch, index)]
            assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.uint8
            y, x, h, w = s["hole"].tolist()
            seen_sizes.update((h, w))
            assert 8 <= h <= 12 and 8 <= w <= 12 and 0 <= y <= 32 - h and 0 <= x <= 32 - w
            fy, fx = s["local_fake"].tolist()
            ry, rx = s["local_real"].tolist()
            assert 0 <= fy <= 16 and 0 <= fx <= 16 and 0 <= ry <= 16 and 0 <= rx <= 16
            # Centred on the hole, clipped inside: the hole lies inside the patch here.
            assert fy <= y and y + h <= fy + 16 and fx <= x and x + w <= fx + 16
            cy, cx = y + h // 2, x + w // 2
            assert fy == min(max(cy - 8, 0), 16) and fx == min(max(cx - 8, 0), 16)
    assert seen_sizes <= set(range(8, 13)) and len(seen_sizes) > 2
    a, b = ds[(1, 2)], ImageFolder(photos, aug, seed=5)[(1, 2)]
    assert all(torch.equal(a[k], b[k]) for k in a)  # a function of (seed, epoch, index)
    c = ds[(2, 2)]
    assert not torch.equal(a["hole"], c["hole"]) or not torch.equal(a["image"], c["image"])


def test_sampler_shards_the_global_batch_and_covers_each_epoch():
    n, batch = 7, 4
    one = StepBatchSampler(n, batch, seed=1, end_step=7)
    halves = [StepBatchSampler(n, batch, seed=1, rank=r, world_size=2, end_step=7) for r in range(2)]
    stream = []
    for full, a, b in zip(one, *halves):
        assert full == a + b
        stream += full
    for epoch in range(4):  # 28 samples = 4 epochs of 7: each image once per epoch
        keys = stream[epoch * n:(epoch + 1) * n]
        assert {e for e, _ in keys} == {epoch}
        assert [i for _, i in keys] == epoch_permutation(n, 1, epoch).tolist()
    resumed = StepBatchSampler(n, batch, seed=1, start_step=3, end_step=7)
    assert list(resumed) == list(one)[3:]
    with pytest.raises(ValueError, match="multiple"):
        StepBatchSampler(n, 3, seed=1, world_size=2)


def test_mean_pixel_masks_and_crops(photos):
    ds = ImageFolder(photos, Augmentation(32, 16, (8, 12)))
    total, count = np.zeros(3), 0
    for f in ds.files:
        image = cv2.imread(os.path.join(photos, f), cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float64)
        total += image.reshape(-1, 3).sum(0)
        count += image.shape[0] * image.shape[1]
    np.testing.assert_allclose(compute_mean_pixel(ds), total / count / 255, rtol=1e-12)
    assert len(compute_mean_pixel(ds, max_images=2)) == 3
    mask = hole_mask(torch.tensor([[2, 3, 4, 5], [0, 0, 1, 1]]), 8)
    assert mask.shape == (2, 1, 8, 8) and mask[0].sum() == 20 and mask[0, 0, 2:6, 3:8].all() and mask[1, 0, 0, 0]
    images = torch.rand(2, 3, 8, 8)
    patches = crop_squares(images, torch.tensor([[1, 2], [4, 0]]), 4)
    assert torch.equal(patches[0], images[0, :, 1:5, 2:6]) and torch.equal(patches[1], images[1, :, 4:8, 0:4])


def test_unreadable_image_is_replaced_deterministically(photos, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(photos, root)
    (root / "aaa_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = ImageFolder(str(root), Augmentation(32, 16, (8, 12)))
    assert ds.files[0] == "aaa_broken.jpg"
    a, b = ds[(0, 0)], ds[(0, 0)]
    assert torch.equal(a["image"], b["image"])


# -- phases ----------------------------------------------------------------------------------------------

def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before, net):
    after = net.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _batch(ds, keys):
    from torch.utils.data import default_collate

    return default_collate([ds[k] for k in keys])


def test_each_phase_updates_exactly_its_networks(photos, tmp_path):
    cfg = tiny_config(photos, tmp_path / "run", phase_steps=(1, 1, 1))
    ds = ImageFolder(photos, cfg.augmentation(), cfg.seed)
    trainer = Trainer(cfg, [0.5, 0.45, 0.4])
    batch = _batch(ds, [(0, 0), (0, 3)])
    # A conv's bias right before BatchNorm has a zero gradient in exact arithmetic (BN
    # subtracts the mean), so it may or may not move; everything else must.
    def must_move(net):
        return {k for k in net.state_dict() if not (k.endswith(".bias") and k.split(".")[-2].startswith(
            ("conv", "deconv")) and k.split(".")[-2] not in ("conv17",))}

    c_must, d_must = must_move(trainer.completion), must_move(trainer.discriminator)
    assert "bn3.running_var" in c_must and "conv17.bias" in c_must and "model_gd.linear6.bias" in d_must
    for phase, c_moves, d_moves in (("completion", True, False), ("discriminator", False, True),
                                    ("joint", True, True)):
        assert trainer.phase == phase
        c0, d0 = _snapshot(trainer.completion), _snapshot(trainer.discriminator)
        metrics = trainer.train_step(batch)
        assert all(torch.isfinite(v) for v in metrics.values()), metrics
        c_changed, d_changed = _changed(c0, trainer.completion), _changed(d0, trainer.discriminator)
        if c_moves:  # parameters and BatchNorm statistics
            assert c_must <= c_changed, c_must - c_changed
        else:
            assert not c_changed, c_changed
        if d_moves:
            assert d_must <= d_changed, d_must - d_changed
        else:
            assert not d_changed, d_changed
    assert set(metrics) == {"mse", "d_loss", "d_real", "d_fake", "adv_loss"}


def test_frozen_changes_nothing_and_restores():
    d = ContextDiscriminator(16, 32, channels=(8, 16, 16, 16, 16)).train()
    before = _snapshot(d)
    with frozen(d):
        assert not any(p.requires_grad for p in d.parameters())
        d(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32))
    assert not _changed(before, d)
    assert all(p.requires_grad for p in d.parameters())
    assert all(m.track_running_stats for m in d.modules() if isinstance(m, nn.BatchNorm2d))


def test_mse_falls_on_a_fixed_batch(photos, tmp_path):
    cfg = tiny_config(photos, tmp_path / "run", phase_steps=(10, 0, 0), batch_size=4)
    ds = ImageFolder(photos, cfg.augmentation(), cfg.seed)
    trainer = Trainer(cfg, [0.5, 0.45, 0.4])
    batch = _batch(ds, [(0, i) for i in range(4)])
    losses = [trainer.train_step(batch)["mse"].item() for _ in range(10)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


# -- checkpoints and the run folder --------------------------------------------------------------------

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


def test_refuses_to_start_in_a_non_empty_folder(photos, tmp_path):
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


def test_resume_refuses_other_settings_and_extends(photos, tmp_path):
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


def test_sigterm_saves_a_checkpoint_and_stops(photos, tmp_path, monkeypatch):
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
