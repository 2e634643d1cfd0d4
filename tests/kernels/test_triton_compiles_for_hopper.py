"""The Triton kernels compile for Hopper (sm_90), checked on any machine, GPU or not.

A kernel that does not compile (a type or shape error in a tl.dot, a wrong constexpr, a
shared-memory pipeline too large for sm_90, ptxas rejecting the PTX) would otherwise be
found only once scarce GPU time is had. tests/triton_aot.py, run here in subprocesses
(the test process has Triton in interpreter mode), records the launches of the real code
paths (the completion network's forward with backend="triton" in every precision and
block order, one forward past M = 2^31, the masked-MSE loss in every dtype, mask
broadcast, index width and reduction), lets Triton specialise them and compiles each
distinct specialisation through ptxas to a cubin, in a private Triton cache so that
nothing comes from earlier runs. See that module for what is covered and how.

GLCIC_FAST_AOT_FULL=1 compiles a larger matrix (every block order x precision, all
autotune configs of the dominant layer in each): slower, for a manual check.
"""

import json
import os
import subprocess
import sys

import pytest

from glcic_fast.nn.architecture import COMPLETION_LAYERS

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_aot.py")
#: Per shard, generous: a shard compiles for about a minute on a 2-core machine.
TIMEOUT_S = 1800


def _num_shards():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _helper_env(cache_dir):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    env.pop("GLCIC_FAST_TRITON_AUTOTUNE", None)  # the Hopper config list the GPU runs
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # compile for real, not from a warm cache
    # The helper imports glcic_fast (and kernels/) from where this process does.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _run_shards(cache_dir, full):
    shards = _num_shards()
    env = _helper_env(cache_dir)
    extra = ["--full"] if full else []
    procs = [subprocess.Popen([sys.executable, HELPER, f"--shard={i}/{shards}", *extra], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    results = []
    try:
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append((i, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return shards, results


def _parse(shard, returncode, out, err):
    events = []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"shard {shard}: unexpected output line {line!r}\nstderr:\n{err[-4000:]}")
    crashes = [e for e in events if e.get("event") == "crash"]
    if crashes:
        pytest.fail(f"shard {shard} crashed:\n{crashes[0]['error']}\nstderr:\n{err[-4000:]}")
    kinds = {e.get("event") for e in events}
    if "skip" not in kinds and "done" not in kinds:  # e.g. the compiler itself crashed
        last = events[-1] if events else None
        pytest.fail(f"shard {shard} exited with {returncode} before finishing; its last report: {last}\n"
                    f"stderr:\n{err[-4000:]}")
    return events


def _report(failures, total, triton_version):
    """The failures grouped by error (one broken line of a kernel fails many
    specialisations the same way): each error once, then what it fails."""
    groups = {}
    for case in failures:
        groups.setdefault(case["error"], []).append(case)
    parts = [f"{len(failures)} of {total} Triton kernel specialisations do not compile for sm_90 "
             f"(Triton {triton_version}), {len(groups)} distinct error(s):"]
    for error, cases in groups.items():
        lines = [f"--- {len(cases)} specialisation(s) fail with:", error, "  failing:"]
        for case in cases:
            more = f" (+{len(case['launches']) - 1} more)" if len(case["launches"]) > 1 else ""
            lines.append(f"  [{case['index']}] {case['summary']}\n      used by: {case['launches'][0]}{more}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def test_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    full = os.environ.get("GLCIC_FAST_AOT_FULL", "0") not in ("", "0")
    shards, results = _run_shards(tmp_path / "triton-cache", full)
    events = [e for shard, code, out, err in results for e in _parse(shard, code, out, err)]

    skips = [e for e in events if e["event"] == "skip"]
    if skips:
        pytest.skip(f"cannot compile for sm_90 here: {skips[0]['reason']}")

    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == shards
    units = {e["units"] for e in starts}
    assert len(units) == 1, f"the shards recorded different launches: {units}"
    units = units.pop()
    cases = [e for e in events if e["event"] == "case"]
    assert sorted(c["index"] for c in cases) == list(range(units)), "every specialisation compiled exactly once"

    # What was covered, from the launches' labels: every layer of the network in every
    # precision, an int64 M, and both masked-MSE kernels.
    labels = [label for c in cases for label in c["launches"]]
    for spec in COMPLETION_LAYERS:
        for precision in ("fp32-ieee", "fp32-tf32", "fp16", "bf16"):
            assert any(label.startswith(f"{spec.name} (") and f") {precision} " in label for label in labels), \
                f"{spec.name} in {precision} was not compiled"
    assert any("M>2^31" in label for label in labels)
    assert {c["kernel"] for c in cases} >= {"_conv_gemm_kernel", "_masked_mse_partials_kernel",
                                            "_masked_mse_finish_kernel"}

    failures = [c for c in cases if not c["ok"]]
    seconds = max(e["seconds"] for e in events if e["event"] == "done")
    print(f"{len(cases)} specialisations of {', '.join(starts[0]['modules'])} compiled for sm_90 "
          f"(Triton {starts[0]['triton']}) in {shards} shards, {seconds:.0f} s, {len(failures)} failed")
    assert not failures, _report(failures, len(cases), starts[0]["triton"])
