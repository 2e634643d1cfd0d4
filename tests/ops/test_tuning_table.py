"""benchmarks/make_tuning_table.py: the dispatcher's tuning table from per-layer conv benchmarks."""

import json
import os
import sys

import pytest
import torch

from glcic_fast import ops
from glcic_fast.ops import dispatch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import make_tuning_table as mtt  # noqa: E402

KEY_D1 = "conv:256:256:k3:s1:d1:bfloat16"
KEY_D2 = "conv:256:256:k3:s1:d2:bfloat16"
KEY_DECONV = "deconv:256:128:k4:s2:d1:bfloat16"


def _bench(op, key, backend, layer, batch, median):
    return {"stats": {"median": median}, "extra_info": {
        "op": op, "tuning_key": key, "backend": backend, "layer": layer, "batch": batch, "input_hw": 256,
        "device": "test-gpu", "torch": "t", "cuda": "c", "triton": "tr"}}


def _results():
    conv, deconv = "conv2d_bias_act", "conv_transpose2d_bias_act"
    return {"benchmarks": [
        # d1: two layers x two batches; cuda wins in total though triton wins one configuration
        _bench(conv, KEY_D1, "cuda", "conv5", 1, 1.0), _bench(conv, KEY_D1, "triton", "conv5", 1, 0.9),
        _bench(conv, KEY_D1, "torch", "conv5", 1, 1.5),
        _bench(conv, KEY_D1, "cuda", "conv5", 8, 5.0), _bench(conv, KEY_D1, "triton", "conv5", 8, 6.0),
        _bench(conv, KEY_D1, "torch", "conv5", 8, 7.0),
        _bench(conv, KEY_D1, "cuda", "conv6", 1, 1.0), _bench(conv, KEY_D1, "triton", "conv6", 1, 1.0),
        _bench(conv, KEY_D1, "torch", "conv6", 1, 1.2),
        # d2: torch wins; a cuda-only extra configuration is not compared
        _bench(conv, KEY_D2, "cuda", "conv7", 1, 2.0), _bench(conv, KEY_D2, "torch", "conv7", 1, 1.0),
        _bench(conv, KEY_D2, "cuda", "conv7", 8, 0.1),
        # deconv: only triton and torch ran
        _bench(deconv, KEY_DECONV, "triton", "deconv13", 1, 3.0), _bench(deconv, KEY_DECONV, "torch", "deconv13", 1, 2.0),
        {"stats": {"median": 1.0}, "extra_info": {"variant": "net"}},  # another benchmark: ignored
    ]}


def test_choice_per_key():
    table = mtt.choose(mtt.measurements(_results()))
    assert table["conv2d_bias_act"][KEY_D1][0] == "cuda"
    assert table["conv2d_bias_act"][KEY_D1][1] == pytest.approx({"cuda": 7.0, "triton": 7.9, "torch": 9.7})
    assert table["conv2d_bias_act"][KEY_D2][0] == "torch"
    assert table["conv_transpose2d_bias_act"][KEY_DECONV][0] == "torch"


def test_writes_and_merges_the_table(tmp_path):
    results = tmp_path / "conv.json"
    results.write_text(json.dumps(_results()))
    out = tmp_path / "tuning.json"
    out.write_text(json.dumps({"conv2d_bias_act": {"conv:64:64:k3:s1:d1:float32": "triton", KEY_D1: "torch"}}))
    assert mtt.main([str(results), "-o", str(out), "--merge"]) == 0
    table = json.loads(out.read_text())
    assert table["conv2d_bias_act"] == {"conv:64:64:k3:s1:d1:float32": "triton", KEY_D1: "cuda", KEY_D2: "torch"}
    assert table["conv_transpose2d_bias_act"] == {KEY_DECONV: "torch"}
    assert table["_meta"]["device"] == "test-gpu"
    assert mtt.main([str(results), "-o", str(out)]) == 0  # without --merge: only what was measured
    assert "conv:64:64:k3:s1:d1:float32" not in json.loads(out.read_text())["conv2d_bias_act"]


def test_tuning_key_is_the_one_the_op_looks_up(monkeypatch):
    seen = []

    def fake_resolve(op, device, *args, backend=None, tuning_key=None, **kwargs):
        seen.append(tuning_key)
        return "torch", lambda *a: None

    monkeypatch.setattr(dispatch, "resolve", fake_resolve)
    x = torch.randn(1, 256, 8, 8, dtype=torch.bfloat16)
    ops.conv2d_bias_act(x, torch.randn(256, 256, 3, 3, dtype=torch.bfloat16), None, padding=2, dilation=2)
    ops.conv_transpose2d_bias_act(x, torch.randn(256, 128, 4, 4, dtype=torch.bfloat16), None, stride=2, padding=1)
    assert seen == [mtt.tuning_key(False, 256, 256, 3, 1, 2, "bfloat16"), mtt.tuning_key(True, 256, 128, 4, 2, 1, "bfloat16")]
    assert seen == [KEY_D2, KEY_DECONV]


def test_the_dispatcher_reads_the_table_named_by_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"conv2d_bias_act": {KEY_D1: "torch"}, "_meta": {"device": "x"}}))
    monkeypatch.setenv("GLCIC_FAST_TUNING", str(path))
    monkeypatch.setattr(dispatch, "_TUNING", None)
    try:
        assert dispatch._order("conv2d_bias_act", torch.device("cuda"), KEY_D1) == ("torch", "cuda", "triton")
        assert dispatch._order("conv2d_bias_act", torch.device("cuda"), KEY_D2) == ("cuda", "triton", "torch")
    finally:
        dispatch._TUNING = None  # re-read (without the variable) by the next user
