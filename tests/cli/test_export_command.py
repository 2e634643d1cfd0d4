"""``glcic-fast export``: the files it writes (dynamic, float16, fixed shape), its exit
statuses and one-line errors; nothing written when it refuses."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import glcic_fast
from glcic_fast.cli import commands as cli

from helpers import REPO, saved_random_net

ort = pytest.importorskip("onnxruntime", reason="reading the exported files needs onnxruntime (the test extra)")
pytest.importorskip("onnxscript", reason="exporting needs onnxscript (the export extra installs it)")


@pytest.fixture(scope="module")
def net_and_weights(tmp_path_factory):
    return saved_random_net(tmp_path_factory.mktemp("weights"), seed=5)


def _run(*argv):
    return cli.main(["export", *map(str, argv)])


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_a_file_that_runs(net_and_weights, tmp_path, capsys):
    net, weights = net_and_weights
    out = tmp_path / "model.onnx"
    assert _run("--weights", weights, "-o", out) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"wrote {out}: float32, input N x 4 x H x W, mean_filled_hole, conv -> ReLU -> BN")
    session = _session(out)
    assert session.get_modelmeta().custom_metadata_map["weights_source"] == glcic_fast.load(weights).weights_source
    x = net.prepare_input(torch.rand(1, 3, 40, 56), torch.zeros(1, 1, 40, 56))
    with torch.inference_mode():
        want = net(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - want).max() <= 1e-5


def test_export_float16_fixed_shape(net_and_weights, tmp_path, capsys):
    _, weights = net_and_weights
    out = tmp_path / "model-fp16.onnx"
    assert _run("--weights", weights, "-o", out, "--dtype", "float16", "--fixed", "64x96", "--batch", "2") == 0
    assert "float16, input 2 x 4 x 64 x 96" in capsys.readouterr().out
    (declared,) = _session(out).get_inputs()
    assert (declared.type, declared.shape) == ("tensor(float16)", [2, 4, 64, 96])


@pytest.mark.parametrize("args, message", [
    (["--weights", "{missing}", "-o", "{out}"], "cannot load weights {missing}: no weights file at {missing}"),
    (["--weights", "{garbage}", "-o", "{out}"], "cannot load weights {garbage}: could not read"),
    (["--weights", "{weights}", "-o", "{tmp}/model.pt"], "end it in .onnx"),
    (["--weights", "{weights}", "-o", "{tmp}/no/such/folder/model.onnx"], "cannot write"),
    (["--weights", "{weights}", "-o", "{out}", "--batch", "2"], "--batch sets the batch size of a --fixed file"),
    (["--weights", "{weights}", "-o", "{out}", "--fixed", "62x64"], "H, W positive multiples of 4"),
    (["--weights", "{weights}", "-o", "{out}", "--fixed", "64x64", "--batch", "0"], "N >= 1"),
], ids=["missing-weights", "garbage-weights", "not-onnx", "no-folder", "batch-without-fixed", "fixed-not-multiple",
        "batch-zero"])
def test_refusals_are_one_line_exit_2(net_and_weights, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    names = {"missing": tmp_path / "missing.pth", "garbage": garbage, "weights": net_and_weights[1],
             "out": tmp_path / "model.onnx", "tmp": tmp_path}
    assert _run(*(a.format(**names) for a in args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("glcic-fast export: error: ") and message.format(**names) in err
    assert err.count("\n") == 1
    assert not (tmp_path / "model.onnx").exists()


def test_bad_fixed_is_an_argparse_error(net_and_weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("--weights", net_and_weights[1], "-o", tmp_path / "model.onnx", "--fixed", "512")
    assert exit_.value.code == 2
    assert "expected HEIGHTxWIDTH such as 512x512, got '512'" in capsys.readouterr().err


def test_exit_status_from_the_shell(tmp_path):
    """The installed entry point: a bad --weights is exit status 2 and one line, no traceback."""
    result = subprocess.run([sys.executable, "-m", "glcic_fast.cli", "export", "--weights", str(tmp_path / "nope.t7"),
                             "-o", str(tmp_path / "model.onnx")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no weights file at" in result.stderr
