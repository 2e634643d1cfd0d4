"""The HTTP service against one request at a time through ``glcic_fast.complete``.

The same requests three ways, on this machine:

- ``sequential``: one at a time, each image and mask file read, completed by
  ``glcic_fast.complete`` alone and written as PNG (what a one-request-at-a-time server
  does, without its HTTP), in one worker thread. Not the main thread: on the 2-core CPU the
  same forwards took up to twice as long from the main thread as from another thread
  (measured side by side; the cause is not known), which would decide the comparison
  instead of the serving;
- ``http-C`` for C = 1, 4 and 16 concurrent clients: POST /v1/complete over loopback to
  the service (uvicorn in this process, the throughput engine with its default batching),
  each client sending its next request as soon as its answer is back; and 16 clients with
  crops grown to share batches (``min_fill`` 0.7, the GPU default) to show what that costs
  or gains on this device.

Every request runs once, untimed, before the first row: all rows then find the convolution
library's per-size work done (see test_sequential_complete). Each row records images/s and
the p50 and p99 latency of its requests (over few requests, p99 is close to the slowest),
the forwards and crops the server ran, and every answer is checked against the sequential result
(a fast answer that is wrong is not a result). Requests: photos (scikit-image) of 512 to
2048 px a side with one or two holes of 64 to 128 px, postprocess off (the network path);
a random-init net (timings do not depend on the weights).

    pytest benchmarks/bench_serve.py --benchmark-only        # the measurement
    GLCIC_FAST_BENCH_SERVE_REQUESTS=32 pytest benchmarks/bench_serve.py --benchmark-only

Under ``--benchmark-disable`` (CI) it runs once on 4 small requests (96 to 160 px, holes
of 12 to 24 px): the same code and checks, in seconds.
"""

import concurrent.futures
import os
import time

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serving benchmark needs the serve extra: pip install 'glcic_fast[serve]'")
httpx = pytest.importorskip("httpx", reason="the serving benchmark needs httpx (the serve extra)")

import glcic_fast
from glcic_fast.imageio import read_image, write_image
from glcic_fast.serving.app import create_app
from glcic_fast.serving.config import ServiceConfig
from glcic_fast.serving.server import serving

from measure import device_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")
REQUESTS = int(os.environ.get("GLCIC_FAST_BENCH_SERVE_REQUESTS", "16"))
_RESULTS = {}


def _requests(folder, count, sizes, holes, seed=0):
    """``count`` (image path, mask path, hole) of random sizes within ``sizes`` (px a side)
    with one or two random holes of ``holes`` px."""
    import skimage.data

    rng = np.random.default_rng(seed)
    made = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        rgb = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        rgb = rgb if rgb.ndim == 3 else np.dstack([rgb] * 3)
        image = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (w, h), interpolation=cv2.INTER_AREA)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            hh, hw = (int(v) for v in rng.integers(holes[0], holes[1] + 1, 2))
            y, x = int(rng.integers(0, h - hh)), int(rng.integers(0, w - hw))
            mask[y:y + hh, x:x + hw] = 255
        image_path, mask_path = str(folder / f"{i:02d}.png"), str(folder / f"{i:02d}_mask.png")
        cv2.imwrite(image_path, image[..., ::-1])
        cv2.imwrite(mask_path, mask)
        made.append((image_path, mask_path, mask > 0))
    return made


@pytest.fixture(scope="module")
def problem(tmp_path_factory, request):
    small = request.config.getoption("benchmark_disable", False)
    folder = tmp_path_factory.mktemp("serve")
    if small:
        requests = _requests(folder, 4, (96, 160), (12, 24))
    else:
        requests = _requests(folder, REQUESTS, (512, 2048), (64, 128))
    torch.manual_seed(0)
    net = glcic_fast.CompletionNet().to(DEVICE).eval()  # on the device: complete() then uses it as it is
    return net, requests, folder, small


def _percentiles(latencies):
    p50, p99 = np.percentile(np.array(latencies), [50, 99])
    return float(p50), float(p99)


def _batches(metrics_text):
    """(forwards, crops) the server ran, from its /metrics, less the warm-up's one."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples}
    return int(values["glcic_fast_batch_crops_count"]) - 1, int(values["glcic_fast_batch_crops_sum"]) - 1


def _record(benchmark, mode, requests, seconds, latencies, small, batches=None):
    p50, p99 = _percentiles(latencies)
    rate = len(requests) / seconds
    _RESULTS[mode] = rate
    benchmark.extra_info.update({
        "device": device_name(), "torch": torch.__version__, "mode": mode, "requests": len(requests),
        "sizes": "96-160 px" if small else "512-2048 px", "images_per_second": round(rate, 3),
        "p50_s": round(p50, 3), "p99_s": round(p99, 3), "postprocess": False,
        "weights": "random init (timings do not depend on the weights)"})
    if batches is not None:
        benchmark.extra_info.update({"forwards": batches[0], "crops": batches[1]})
    if "sequential" in _RESULTS and mode != "sequential":
        benchmark.extra_info["vs_sequential"] = round(rate / _RESULTS["sequential"], 2)
    print(f"\n[bench_serve] {mode}: {len(requests)} requests in {seconds:.1f} s, {rate:.3f} images/s, "
          f"p50 {p50:.2f} s, p99 {p99:.2f} s" + (f", {batches[1]} crops in {batches[0]} forwards" if batches else "")
          + (f", {rate / _RESULTS['sequential']:.2f}x sequential" if mode != "sequential" and "sequential" in _RESULTS
             else ""))


@pytest.mark.benchmark(group="serve", warmup=False)
def test_sequential_complete(benchmark, problem):
    net, requests, folder, small = problem
    # Warm-up, untimed: every request once. The convolution library's first call at a new
    # input size costs about twice a later one (oneDNN creates and caches its primitives per
    # size on the CPU); without this the first row timed would pay it for every row.
    for image, mask, _ in requests:
        glcic_fast.complete(image, mask, weights=net, device=DEVICE)

    def one_at_a_time():
        latencies = []
        start = time.perf_counter()
        for image, mask, _ in requests:
            t = time.perf_counter()
            out = glcic_fast.complete(image, mask, weights=net, device=DEVICE)
            write_image(image.replace(".png", "_sequential.png"), out)
            latencies.append(time.perf_counter() - t)
        return time.perf_counter() - start, latencies

    def run():  # in a worker thread, as the server's engine runs (see the module's docstring)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(one_at_a_time).result()

    seconds, latencies = benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, "sequential", requests, seconds, latencies, small)


def _post(client, url, image, mask):
    with open(image, "rb") as f, open(mask, "rb") as m:
        files = {"image": ("image.png", f.read(), "image/png"), "mask": ("mask.png", m.read(), "image/png")}
    t = time.perf_counter()
    response = client.post(f"{url}/v1/complete", files=files, data={"postprocess": "false"}, timeout=3600)
    return response, time.perf_counter() - t


@pytest.mark.benchmark(group="serve", warmup=False)
@pytest.mark.parametrize("clients, min_fill", [(1, None), (4, None), (16, None), (16, 0.7)],
                         ids=["1", "4", "16", "16-grown"])
def test_http_concurrent_clients(benchmark, problem, clients, min_fill):
    """``min_fill`` None: the engine's default for the device (on a CPU, only crops of one
    size share a batch); 0.7: crops grown to share batches, as on a GPU by default."""
    net, requests, folder, small = problem
    with serving(create_app(net, ServiceConfig(device=str(DEVICE), min_fill=min_fill))) as url:

        def run():
            todo = iter(range(len(requests)))
            answers = {}

            def client():
                with httpx.Client() as session:
                    for i in todo:  # shared: each client takes the next request when it is free
                        answers[i] = _post(session, url, *requests[i][:2])

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                for f in [pool.submit(client) for _ in range(clients)]:
                    f.result()
            return time.perf_counter() - start, answers

        seconds, answers = benchmark.pedantic(run, rounds=1, iterations=1)
        batches = _batches(httpx.get(f"{url}/metrics").text)
    for i, (image, _, hole) in enumerate(requests):
        response, _ = answers[i]
        assert response.status_code == 200, response.text
        answer = os.path.join(folder, f"{i:02d}_http{clients}.png")
        with open(answer, "wb") as f:
            f.write(response.content)
        got, source = read_image(answer), read_image(image)
        assert torch.equal(got[:, ~torch.from_numpy(hole)], source[:, ~torch.from_numpy(hole)])
        sequential = image.replace(".png", "_sequential.png")
        if os.path.exists(sequential):  # the same as complete() alone, up to a rounding tip
            assert (got - read_image(sequential)).abs().max().item() <= 1 / 255 + 1e-6
    mode = f"http-{clients}" + ("" if min_fill is None else f"-min_fill-{min_fill}")
    _record(benchmark, mode, requests, seconds, [answers[i][1] for i in answers], small, batches)
