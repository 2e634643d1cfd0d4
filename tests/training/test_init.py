"""``--init``: a run that starts its completion net from weights users hold (the authors'
.t7, a GLCIC-PyTorch checkpoint, mmagic's Global&Local checkpoint), with a fresh
discriminator and fresh optimisers, the weights' mean pixel, block order and output
activation, recorded; resuming such a run; files it cannot use."""

import csv
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import glcic_fast
from glcic_fast.cli import build_parser
from glcic_fast.nn.architecture import COMPLETION_LAYERS
from glcic_fast.nn.reference import ReferenceCompletionNet
from glcic_fast.nn.state_dict import MMAGIC_MODULES
from glcic_fast.training.checkpoints import latest_checkpoint
from glcic_fast.training.config import TrainingError
from glcic_fast.training.data import ImageFolder, StepBatchSampler, hole_mask
from glcic_fast.training.run import resume_run, train

from helpers import randomize
from t7_writer import authors_sequential, authors_t7_table, write_t7

T7_MEAN = [0.41, 0.43, 0.39]


@pytest.fixture(scope="module")
def t7_file(tmp_path_factory):
    """The authors' .t7 layout with random weights and BatchNorm statistics."""
    path = tmp_path_factory.mktemp("weights") / "completionnet_places2.t7"
    write_t7(path, authors_t7_table(authors_sequential(seed=11), T7_MEAN))
    return str(path)


def _final_state(run_dir) -> dict:
    return latest_checkpoint(str(run_dir))[1]


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_init_from_t7_starts_the_completion_net_there_and_records_it(photos, tiny_config, tmp_path, t7_file):
    """A run of no steps from the .t7 holds the file's completion net exactly, a
    discriminator as fresh as a run without --init, no optimiser state, the file's mean
    pixel; config.json and the checkpoint say where the weights came from."""
    expected = glcic_fast.load(t7_file).state_dict()
    train(tiny_config(photos, tmp_path / "init", phase_steps=(0, 0, 0), init=t7_file))
    state = _final_state(tmp_path / "init")
    _assert_same(state["completion"], expected, "completion net")
    np.testing.assert_allclose(state["mean_pixel"], np.float32(T7_MEAN), rtol=0, atol=1e-7)
    assert not state["opt_c"]["state"] and not state["opt_d"]["state"]
    train(tiny_config(photos, tmp_path / "fresh", phase_steps=(0, 0, 0), mean_pixel=(0.5, 0.5, 0.5)))
    fresh = _final_state(tmp_path / "fresh")
    _assert_same(state["discriminator"], fresh["discriminator"], "discriminator")
    assert not torch.equal(state["completion"]["conv1.weight"], fresh["completion"]["conv1.weight"])

    with open(t7_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(tmp_path / "init" / "config.json") as f:
        recorded = json.load(f)["config"]["init_weights"]
    assert recorded["path"] == t7_file and recorded["sha256"] == digest and "Torch7" in recorded["weights"]
    assert recorded["bn_after_relu"] is False and state["config"]["init_weights"] == recorded
    assert state["config"]["init"] == t7_file
    # The exported weights are the same net, ready for glcic_fast.load.
    exported = glcic_fast.load(str(tmp_path / "init" / "completionnet.safetensors"))
    _assert_same(exported.state_dict(), expected, "exported")


def test_init_trains_from_the_weights_in_any_phase(photos, tiny_config, tmp_path, t7_file):
    """Phase 1 from the .t7 moves its weights by ADADELTA's first step, which is at most
    lr * sqrt(eps / (1 - rho)) per parameter; a discriminator-phase start keeps them
    exactly (C is fixed there) while D trains."""
    initial = glcic_fast.load(t7_file).state_dict()
    cfg = tiny_config(photos, tmp_path / "phase1", phase_steps=(1, 0, 0), init=t7_file)
    train(cfg)
    after = _final_state(tmp_path / "phase1")["completion"]
    bound = cfg.lr * (cfg.eps / (1 - cfg.rho)) ** 0.5
    for name, param in glcic_fast.CompletionNet().named_parameters():
        change = (after[name] - initial[name]).abs().max().item()
        assert 0 < change <= bound * (1 + 1e-4), (name, change, bound)

    train(tiny_config(photos, tmp_path / "phase2", phase_steps=(0, 1, 0), init=t7_file))
    state = _final_state(tmp_path / "phase2")
    _assert_same(state["completion"], initial, "completion net in the discriminator phase")
    assert state["opt_d"]["state"] and not state["opt_c"]["state"]


@pytest.fixture
def glcic_pytorch_file(tmp_path):
    """A GLCIC-PyTorch checkpoint (conv -> ReLU -> BN) with its run's config.json."""
    folder = tmp_path / "glcic_pytorch"
    folder.mkdir()
    torch.save(randomize(ReferenceCompletionNet(bn_after_relu=True), seed=12).state_dict(), folder / "model_cn")
    (folder / "config.json").write_text(json.dumps({"mpv": [0.47, 0.45, 0.41]}))
    return str(folder / "model_cn")


def test_init_needs_the_weights_block_order(photos, tiny_config, tmp_path, glcic_pytorch_file, t7_file):
    with pytest.raises(TrainingError, match="add --bn-after-relu"):
        train(tiny_config(photos, tmp_path / "paper_order", phase_steps=(0, 0, 0), init=glcic_pytorch_file))
    assert not (tmp_path / "paper_order").exists()  # refused before anything is written
    with pytest.raises(TrainingError, match="leave out --bn-after-relu"):
        train(tiny_config(photos, tmp_path / "their_order", phase_steps=(0, 0, 0), init=t7_file,
                          bn_after_relu=True))
    train(tiny_config(photos, tmp_path / "ok", phase_steps=(0, 0, 0), init=glcic_pytorch_file, bn_after_relu=True))
    state = _final_state(tmp_path / "ok")
    _assert_same(state["completion"], glcic_fast.load(glcic_pytorch_file).state_dict(), "completion net")
    np.testing.assert_allclose(state["mean_pixel"], [0.47, 0.45, 0.41])  # the run's config.json mpv
    assert "GLCIC-PyTorch" in state["config"]["init_weights"]["weights"]


def test_mean_pixel_given_overrides_the_weights(photos, tiny_config, tmp_path, t7_file):
    train(tiny_config(photos, tmp_path / "run", phase_steps=(0, 0, 0), init=t7_file, mean_pixel=(0.3, 0.3, 0.3)))
    state = _final_state(tmp_path / "run")
    assert state["mean_pixel"] == [0.3, 0.3, 0.3]
    np.testing.assert_allclose(state["config"]["init_weights"]["mean_pixel"], np.float32(T7_MEAN))


def test_resume_keeps_the_checkpoint_and_refuses_other_weights(photos, tiny_config, tmp_path, t7_file,
                                                               glcic_pytorch_file):
    """On resume the run's checkpoint wins: the weights file is not read again (it may be
    gone), and naming another one is refused."""
    import shutil

    own = str(tmp_path / "mine.t7")
    shutil.copy(t7_file, own)
    run = tmp_path / "run"
    train(tiny_config(photos, run, phase_steps=(1, 0, 0), init=own))
    recorded = _final_state(run)["config"]["init_weights"]
    os.unlink(own)
    with pytest.raises(TrainingError, match="init"):
        train(tiny_config(photos, run, phase_steps=(2, 0, 0), init=glcic_pytorch_file), resume=True)
    summary = train(tiny_config(photos, run, phase_steps=(2, 0, 0), init=own), resume=True)
    assert summary["step"] == 2
    assert _final_state(run)["config"]["init_weights"] == recorded  # still says where the run began
    args = build_parser().parse_args(["train", photos, "--out", str(run), "--resume", "--phase-steps", "3", "0", "0",
                                      "--device", "cpu", "--workers", "0", "--no-progress"])
    assert args.func(args) == 0 and _final_state(run)["step"] == 3


def test_weights_it_cannot_read_are_refused_clearly(photos, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    for weights in (str(junk), str(tmp_path / "missing.t7")):
        out = tmp_path / "run"
        args = build_parser().parse_args(["train", photos, "--out", str(out), "--init", weights, "--device", "cpu",
                                          "--no-progress"])
        assert args.func(args) == 1
        err = capsys.readouterr().err
        assert f"cannot start from --init {weights}" in err and "Traceback" not in err
        assert not out.exists()


def test_a_file_without_a_mean_pixel_takes_the_one_given(photos, tiny_config, tmp_path, glcic_pytorch_file):
    os.unlink(os.path.join(os.path.dirname(glcic_pytorch_file), "config.json"))
    with pytest.raises(TrainingError, match="give --mean-pixel"):
        train(tiny_config(photos, tmp_path / "refused", phase_steps=(0, 0, 0), init=glcic_pytorch_file,
                          bn_after_relu=True))
    train(tiny_config(photos, tmp_path / "run", phase_steps=(0, 0, 0), init=glcic_pytorch_file, bn_after_relu=True,
                      mean_pixel=(0.4, 0.4, 0.4)))
    state = _final_state(tmp_path / "run")
    assert state["mean_pixel"] == [0.4, 0.4, 0.4] and state["config"]["init_weights"]["mean_pixel"] is None


@pytest.fixture
def mmagic_file(tmp_path):
    """A checkpoint in mmagic's Global&Local layout (``{"meta", "state_dict"}``, the
    generator's keys under ``generator.``; mmcv's convs before a BN have no bias), from a
    net with random weights and BatchNorm statistics."""
    source = randomize(ReferenceCompletionNet(bn_after_relu=False, output_activation="hardtanh"), seed=13)
    state = source.state_dict()
    layout = {}
    for spec, module in zip(COMPLETION_LAYERS, MMAGIC_MODULES):
        layout[f"generator.{module}.conv.weight"] = state[f"{spec.name}.weight"]
        if spec.has_bn:
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                layout[f"generator.{module}.bn.{key}"] = state[f"bn{spec.index}.{key}"]
        else:
            layout[f"generator.{module}.conv.bias"] = state[f"{spec.name}.bias"]
    path = tmp_path / "gl_256x256_8x12_places.pth"
    torch.save({"meta": {"iter": 500000}, "state_dict": layout}, path)
    return str(path)


def test_init_from_mmagic_fine_tunes_its_clamped_bgr_net(photos, tiny_config, tmp_path, mmagic_file):
    """mmagic's net needs its output activation (a clamp to [-1, 1]) given, like a block
    order; then the run starts from the file's weights, its first MSE is measured on the
    RGB image in [0, 1] that the net's clamped BGR [-1, 1] output stands for, and its
    exported weights keep mmagic's conventions."""
    with pytest.raises(TrainingError, match="--output-activation hardtanh"):
        train(tiny_config(photos, tmp_path / "refused", phase_steps=(0, 0, 0), init=mmagic_file))
    cfg = tiny_config(photos, tmp_path / "run", phase_steps=(1, 0, 0), init=mmagic_file, output_activation="hardtanh")
    loaded = glcic_fast.load(mmagic_file)
    assert loaded.input_convention == glcic_fast.SIGNED_BGR_ZERO_HOLE and loaded.output_activation == "hardtanh"

    # Step 0's MSE by hand: the loaded net in training mode (batch statistics) on step 0's
    # samples, its output taken from BGR in [-1, 1] to RGB in [0, 1].
    ds = ImageFolder(photos, cfg.augmentation(), cfg.seed)
    batch = default_collate([ds[key] for key in StepBatchSampler(len(ds), cfg.batch_size, cfg.seed).batch(0)])
    x = batch["image"].float() / 255
    mask = hole_mask(batch["hole"], cfg.image_size)
    with torch.no_grad():
        raw = loaded.train()(loaded.prepare_input(x, mask))
    assert -1 <= raw.min() < raw.max() <= 1
    rgb = (raw * 0.5 + 0.5).flip(1)
    expected = (((rgb - x) * mask) ** 2).sum() / (mask.sum() * 3)

    train(cfg)
    with open(tmp_path / "run" / "losses.csv") as f:
        first = next(csv.DictReader(f))
    assert float(first["mse"]) == pytest.approx(expected.item(), rel=1e-5)
    state = _final_state(tmp_path / "run")
    recorded = state["config"]["init_weights"]
    assert "mmagic" in recorded["weights"] and recorded["output_activation"] == "hardtanh"
    assert recorded["mean_pixel"] is None  # mmagic's normalisation is fixed
    # Resumed (the run's own settings), it stays mmagic's kind of net.
    assert resume_run(photos, str(tmp_path / "run"), phase_steps=(2, 0, 0), device="cpu", workers=0,
                      progress=False)["step"] == 2
    exported = glcic_fast.load(str(tmp_path / "run" / "completionnet.safetensors"))
    assert exported.output_activation == "hardtanh" and exported.input_convention == glcic_fast.SIGNED_BGR_ZERO_HOLE
