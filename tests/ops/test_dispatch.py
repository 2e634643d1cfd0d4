"""The dispatcher: quiet fallback for automatic choices, clear errors for named ones."""

import pytest
import torch

from glcic_fast import CompletionNet, ops


def _args():
    x = torch.rand(1, 8, 6, 6)
    w = torch.rand(4, 8, 3, 3)
    return x, w, torch.rand(4)


def test_automatic_choice_on_cpu_falls_back_to_torch_and_says_why():
    x, w, b = _args()  # 4 output channels: not a layer the CPU Winograd kernel ("cpp") covers
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, b, 1, 1, 1, "relu", None, None)
    assert chosen == "torch"
    if "cpp" in ops.available_backends("conv2d_bias_act"):
        assert len(skipped) == 1 and skipped[0].startswith("cpp: ") and "multiples of 16" in skipped[0], skipped
    else:
        assert skipped == []


def test_named_backend_that_cannot_run_raises_with_the_reason():
    x, w, b = _args()
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.conv2d_bias_act(x, w, b, padding=1, backend="cuda")


def test_unknown_backend_name():
    x, w, b = _args()
    with pytest.raises(ValueError, match="unknown backend"):
        ops.conv2d_bias_act(x, w, b, backend="mps")


def test_environment_variable_names_the_backend(monkeypatch):
    x, w, b = _args()
    monkeypatch.setenv("GLCIC_FAST_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailable):
        ops.conv2d_bias_act(x, w, b, padding=1)
    monkeypatch.setenv("GLCIC_FAST_BACKEND", "torch")
    assert ops.conv2d_bias_act(x, w, b, padding=1).shape == (1, 4, 6, 6)


def test_op_argument_errors():
    x, w, b = _args()
    with pytest.raises(ValueError, match="activation"):
        ops.conv2d_bias_act(x, w, b, activation="gelu")
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_bias_act(x[:, :4], w, b)
    with pytest.raises(ValueError, match="give both or neither"):
        ops.conv2d_bias_act(x, w, b, post_scale=torch.ones(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.conv2d_bias_act(x, w, torch.rand(3))
    with pytest.raises(ValueError, match="float64"):
        ops.conv2d_bias_act(x, w.double(), b)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "none"])
def test_torch_backend_matches_the_formula(transposed, activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 7, 9, generator=g, dtype=torch.float64)
    w = torch.randn(*((8, 5) if transposed else (5, 8)), 4 if transposed else 3, 4 if transposed else 3, generator=g, dtype=torch.float64)
    b, s, t = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    if transposed:
        got = ops.conv_transpose2d_bias_act(x, w, b, stride=2, padding=1, activation=activation, post_scale=s, post_shift=t, backend="torch")
        y = torch.nn.functional.conv_transpose2d(x, w, b, stride=2, padding=1)
    else:
        got = ops.conv2d_bias_act(x, w, b, padding=2, dilation=2, activation=activation, post_scale=s, post_shift=t, backend="torch")
        y = torch.nn.functional.conv2d(x, w, b, padding=2, dilation=2)
    y = {"relu": torch.relu, "sigmoid": torch.sigmoid, "none": lambda v: v}[activation](y)
    want = y * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_net_says_which_backend_runs_each_layer():
    lines = CompletionNet().eval().explain_backends(torch.rand(1, 4, 16, 16))
    assert len(lines) == 17 and lines[0].startswith("conv1: torch")


def test_non_automatic_backend_needs_a_tuning_table_entry(monkeypatch):
    """A backend registered with automatic=False is chosen automatically only for the
    shapes the tuning table names it for; by name it runs anywhere its check allows."""
    from glcic_fast.ops import dispatch

    monkeypatch.setitem(dispatch._REGISTRY, "unit_test_op", {})
    dispatch.register("unit_test_op", "torch", lambda: "torch ran", lambda: None)
    dispatch.register("unit_test_op", "cuda", lambda: "cuda ran", lambda: None, automatic=False)
    gpu = torch.device("cuda")  # a device object only: the checks above never touch a GPU
    monkeypatch.setattr(dispatch, "_TUNING", {})
    chosen, skipped = dispatch.explain("unit_test_op", gpu, tuning_key="k")
    assert chosen == "torch" and skipped == ["cuda: taken automatically only where the tuning table measured it fastest"]
    monkeypatch.setattr(dispatch, "_TUNING", {"unit_test_op": {"k": "cuda"}})
    assert dispatch.explain("unit_test_op", gpu, tuning_key="k") == ("cuda", [])
    assert dispatch.explain("unit_test_op", gpu, tuning_key="other")[0] == "torch"
    monkeypatch.setattr(dispatch, "_TUNING", {})
    assert dispatch.resolve("unit_test_op", gpu, backend="cuda")[1]() == "cuda ran"
