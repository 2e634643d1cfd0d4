"""``glcic-fast serve`` as a user runs it: it refuses to start without usable weights, and
SIGTERM stops it accepting connections, answers the requests in flight, then exits 0
(a real process on a free loopback port)."""

import concurrent.futures
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

pytest.importorskip("fastapi", reason="the serving tests need the serve extra: pip install 'glcic_fast[serve]'")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx (the serve extra)")

import glcic_fast
from glcic_fast.cli import commands as cli
from glcic_fast.imageio import read_image

from helpers import REPO, saved_random_net
from photos import photo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, url, seconds=180):
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the server never became ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def png(image: torch.Tensor) -> bytes:
    array = (image.permute(1, 2, 0).numpy()[..., ::-1] * 255 + 0.5).astype(np.uint8)
    return cv2.imencode(".png", array)[1].tobytes()


def post(url, data: bytes, rects: str):
    return httpx.post(f"{url}/v1/complete", files={"image": ("p.png", data, "image/png")},
                      data={"rects": rects, "postprocess": "false"}, timeout=600)


def check_answer(response, data: bytes, rect, net, tmp_path):
    assert response.status_code == 200, response.text
    (tmp_path / "in.png").write_bytes(data)
    (tmp_path / "out.png").write_bytes(response.content)
    x, y, w, h = rect
    mask = torch.zeros(1, *read_image(tmp_path / "in.png").shape[-2:])
    mask[:, y:y + h, x:x + w] = 1
    want = glcic_fast.complete(str(tmp_path / "in.png"), mask, weights=net)
    assert (read_image(tmp_path / "out.png") - want).abs().max().item() <= 0.5 / 255 + 1e-5


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv("GLCIC_FAST_WEIGHTS", raising=False)


def test_refuses_to_start_without_usable_weights(tmp_path, capsys):
    assert cli.main(["serve", "--port", "1"]) == 2
    assert "no weights" in capsys.readouterr().err
    assert cli.main(["serve", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "cannot load weights" in capsys.readouterr().err
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    assert cli.main(["serve", "--weights", str(tmp_path / "bad.pth")]) == 2
    assert "cannot load weights" in capsys.readouterr().err
    assert cli.main(["serve", "--random-weights", "--weights", str(tmp_path / "bad.pth")]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert cli.main(["serve", "--random-weights", "--max-wait-ms", "-1"]) == 2
    assert "--max-wait-ms must be 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own errors exit with 2 as well
        cli.main(["serve", "--random-weights", "--max-batch", "0"])
    assert exc.value.code == 2


def test_sigterm_drains_the_requests_in_flight(tmp_path):
    net, weights = saved_random_net(tmp_path, seed=6)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("GLCIC_FAST_WEIGHTS", None)
    proc = subprocess.Popen([sys.executable, "-m", "glcic_fast.cli", "serve", "--weights", weights, "--port", str(port),
                             "--device", "cpu", "--max-wait-ms", "0"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc, url)
        # Three sizes: three batches one after the other, a second or more each on a CPU.
        requests = [(png(photo(name, 320, 320 + 8 * i)), (40 + i, 50, 60, 40))
                    for i, name in enumerate(("chelsea", "coffee", "astronaut"))]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(lambda r: (post(url, r[0], ",".join(map(str, r[1]))), time.monotonic()), r)
                       for r in requests]
            deadline = time.monotonic() + 60
            while "glcic_fast_requests_in_flight 3.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the requests never got in flight"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            refused = False
            while not refused and time.monotonic() < signalled + 30:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    time.sleep(0.05)
                except httpx.TransportError:
                    refused = True
            answers = [f.result() for f in futures]
        assert refused, "the server kept accepting connections after SIGTERM"
        assert any(done > signalled for _, done in answers)  # answered after the signal: drained
        for (response, _), (data, rect) in zip(answers, requests):
            check_answer(response, data, rect, net, tmp_path)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
