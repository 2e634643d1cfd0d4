"""The Ray Serve application on a local Ray on the CPU, as ``glcic-fast serve --ray``
starts it: concurrent requests through Ray's proxy get what glcic_fast.complete gives,
the same app's metrics answer, and SIGTERM shuts Serve and Ray down (exit 0).

Ray's node is bound to the loopback address (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a
single-node Ray that talks over 127.0.0.1 only) and sends no usage statistics."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.serve", reason="the Ray Serve test needs ray[serve] (the serve extra)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx (the serve extra)")

from helpers import REPO, saved_random_net
from photos import photo
from test_serve_command import check_answer, free_port, png, post, wait_ready


def test_ray_serve_application_on_a_local_ray(tmp_path):
    net, weights = saved_random_net(tmp_path, seed=7)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=REPO, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("GLCIC_FAST_WEIGHTS", None)
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "glcic_fast.cli", "serve", "--ray", "--weights", weights,
                             "--port", str(port), "--device", "cpu", "--max-wait-ms", "20"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_ready(proc, url, seconds=300)
        except AssertionError:
            raise AssertionError((tmp_path / "serve.log").read_text()[-5000:])
        requests = [(png(photo(name, 48, 64)), (5 + 3 * i, 10, 20, 16))
                    for i, name in enumerate(("chelsea", "coffee", "astronaut"))]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: post(url, r[0], ",".join(map(str, r[1]))), requests))
        for response, (data, rect) in zip(answers, requests):
            check_answer(response, data, rect, net, tmp_path)
        assert 'glcic_fast_requests_total{status="200"} 3.0' in httpx.get(f"{url}/metrics").text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0, (tmp_path / "serve.log").read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:  # Ray's own processes, started in the server's session: none may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
