"""The package imports and works when Triton or the C++ extension cannot be loaded: it
falls back to torch and says why the others are missing."""

import json
import os
import subprocess
import sys

import helpers

SCRIPT = r"""
import json, sys

import torch

# None in sys.modules makes `import name` raise ImportError, as if it were not installed.
for name in sys.argv[1].split(","):
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]
    sys.modules[name] = None

import glcic_fast
from glcic_fast import ops

net = glcic_fast.CompletionNet().eval()
with torch.inference_mode():
    out = net(torch.rand(1, 4, 16, 16))
pred = torch.rand(2, 3, 8, 8, requires_grad=True)
loss = ops.masked_mse(pred, torch.rand(2, 3, 8, 8), torch.ones(2, 1, 8, 8))
loss.backward()
try:
    ops.conv2d_bias_act(torch.rand(1, 4, 8, 8), torch.rand(4, 4, 3, 3), None, backend="triton")
    named = "ran"
except ops.BackendUnavailable as exc:
    named = str(exc)
print(json.dumps({"errors": ops.BACKEND_LOAD_ERRORS, "shape": list(out.shape),
                  "conv_backends": ops.available_backends("conv2d_bias_act"),
                  "mse_backends": ops.available_backends("masked_mse"),
                  "finite_grad": bool(torch.isfinite(pred.grad).all()), "named_triton": named}))
"""


def _run(blocked):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, blocked], capture_output=True, text=True, env=env,
                            cwd=helpers.REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_triton_and_without_the_extension():
    report = _run("triton,glcic_fast._C")
    assert report["shape"] == [1, 3, 16, 16] and report["finite_grad"]
    assert report["conv_backends"] == ["torch"] and report["mse_backends"] == ["torch"]
    assert "triton" in report["errors"] and "import of triton halted" in report["errors"]["triton"]
    assert "cpp" in report["errors"] and "cuda" in report["errors"]
    assert "triton" in report["named_triton"] and "import of triton halted" in report["named_triton"], \
        "asking for a missing backend by name says why"
