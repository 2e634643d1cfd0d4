"""POST /v1/complete over real HTTP on loopback (uvicorn in a thread, httpx clients): real
photos from concurrent clients get what glcic_fast.complete gives each alone; every fault
gets its status and a one-line message, and the server keeps serving; a client that goes
away has its work dropped; health, readiness and metrics."""

import concurrent.futures
import time

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the serve extra: pip install 'glcic_fast[serve]'")
pytest.importorskip("uvicorn", reason="the serving tests need the serve extra: pip install 'glcic_fast[serve]'")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx (the serve extra)")

import glcic_fast
from glcic_fast.imageio import read_image
from glcic_fast.serving.app import create_app
from glcic_fast.serving.config import ServiceConfig
from glcic_fast.serving.server import serving as running

from serving_helpers import GatedRunner, metric
from helpers import randomize
from photos import photo

TIMEOUT = 300


@pytest.fixture(scope="module")
def net():
    return randomize(glcic_fast.CompletionNet(), seed=5).eval()


def _png(array) -> bytes:
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def _photo_bgr(name, h, w):
    return np.ascontiguousarray((photo(name, h, w).permute(1, 2, 0).numpy()[..., ::-1] * 255 + 0.5).astype(np.uint8))


def _mask(h, w, *rects):
    mask = np.zeros((h, w), np.uint8)
    for x, y, rw, rh in rects:
        mask[y:y + rh, x:x + rw] = 255
    return mask


def _post(url, image: bytes, mask: bytes = None, timeout=TIMEOUT, **fields):
    files = {"image": ("photo.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return httpx.post(f"{url}/v1/complete", files=files, data=fields, timeout=timeout)


def _check(response, image_bytes, hole, tmp_path, net, postprocess):
    """The answer is a PNG of the input's size and sample type, the input outside the
    holes, glcic_fast.complete's result (on the same file alone) inside them."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    source, answer = tmp_path / f"in{id(response)}.png", tmp_path / f"out{id(response)}.png"
    source.write_bytes(image_bytes)
    answer.write_bytes(response.content)
    raw_in = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    raw_out = cv2.imread(str(answer), cv2.IMREAD_UNCHANGED)
    assert raw_out.shape == raw_in.shape and raw_out.dtype == raw_in.dtype
    assert np.array_equal(raw_out[~hole], raw_in[~hole])
    want = glcic_fast.complete(str(source), torch.from_numpy(hole)[None].float(), weights=net, postprocess=postprocess)
    level = 1 / (65535 if raw_in.dtype == np.uint16 else 255)
    # Half a level of rounding to the PNG's samples, plus the batch's last bits; the blend
    # rounds inside the holes to 8 bits itself, where those bits may tip a level.
    tolerance = (1.5 if postprocess else 0.5) * level + 1e-5
    assert (read_image(answer) - want).abs().max().item() <= tolerance


def test_concurrent_clients_get_what_complete_gives(net, tmp_path):
    runner = GatedRunner(net)
    config = ServiceConfig(max_batch=4, max_wait_ms=20)
    h, w = 520, 600
    cases = [  # (image bytes, mask bytes or None, fields)
        (_png(_photo_bgr("chelsea", 40, 52).astype(np.uint16) * 257), None, {"rects": "4,4,16,16"}),
        (_png(_photo_bgr("chelsea", h, w)), _png(_mask(h, w, (120, 100, 40, 40))), {}),
        (_png(_photo_bgr("coffee", h, w)), None, {"rects": "120,100,40,40", "postprocess": "false"}),
        (_png(cv2.cvtColor(_photo_bgr("astronaut", 48, 64), cv2.COLOR_BGR2GRAY)), None,
         {"rects": "10,10,20,24;40,30,30,30", "postprocess": "false"}),
        (_png(np.dstack([_photo_bgr("rocket", 48, 64), np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))])),
         _png(_mask(48, 64, (0, 30, 20, 22))), {"postprocess": "false"}),
    ]
    holes = [_mask(40, 52, (4, 4, 16, 16)), _mask(h, w, (120, 100, 40, 40)), _mask(h, w, (120, 100, 40, 40)),
             _mask(48, 64, (10, 10, 20, 24), (40, 30, 30, 30)), _mask(48, 64, (0, 30, 20, 22))]
    with running(create_app(net, config, runner=runner)) as url:
        # The pool after the gate: a failing check opens the gate before the pool waits.
        with concurrent.futures.ThreadPoolExecutor(len(cases) + 1) as pool, runner.held():
            first = pool.submit(_post, url, cases[0][0], cases[0][1], **cases[0][2])
            assert runner.entered.wait(60)  # the first crop holds the (gated) device
            rest = [pool.submit(_post, url, image, mask, **fields) for image, mask, fields in cases[1:]]
            bad = pool.submit(_post, url, b"not an image", None, rects="1,1,5,5")
            deadline = time.monotonic() + 60
            while metric(url, "glcic_fast_queue_depth") < 4:  # every other crop waits for the device
                assert time.monotonic() < deadline, "the other requests never reached the engine"
                time.sleep(0.02)
            runner.gate.set()
            responses = [first.result()] + [f.result() for f in rest]
            assert bad.result().status_code == 400  # refused alone; the others are unharmed
        for (image, _, fields), hole, response in zip(cases, holes, responses):
            _check(response, image, hole > 0, tmp_path, net, fields.get("postprocess", "true") == "true")
        # The two 520 x 600 photos' crops ran as one batch, the two 48 x 64 images as another.
        assert sorted(s[0] for s in runner.shapes[-2:]) == [2, 2]
        assert metric(url, "glcic_fast_batch_crops_count") == 4  # the warm-up, the first, two pairs
        assert metric(url, "glcic_fast_batch_crops_bucket", 'le="1.0"') == 2
        assert metric(url, "glcic_fast_requests_total", 'status="200"') == 5
        assert metric(url, "glcic_fast_requests_total", 'status="400"') == 1
        received = metric(url, "glcic_fast_pixels_received_total")
        computed = metric(url, "glcic_fast_pixels_computed_total")
        assert received == 2 * h * w + 2 * 48 * 64 + 40 * 52
        assert 0 < computed < received  # ROI: the large photos' crops only


def test_health_readiness_and_metrics(net):
    with running(create_app(net, ServiceConfig())) as url:
        assert httpx.get(f"{url}/healthz").json() == {"alive": True}
        assert httpx.get(f"{url}/readyz").json() == {"ready": True}
        text = httpx.get(f"{url}/metrics").text
        for name in ("glcic_fast_requests_total", "glcic_fast_request_seconds_bucket", "glcic_fast_batch_crops_bucket",
                     "glcic_fast_queue_depth", "glcic_fast_requests_in_flight", "glcic_fast_pixels_received_total",
                     "glcic_fast_pixels_computed_total"):
            assert name in text, name


def test_not_ready_until_warm_answers_503_with_retry_after(net, tmp_path):
    runner = GatedRunner(net)
    image, hole = _photo_bgr("coffee", 40, 60), _mask(40, 60, (10, 10, 12, 12))
    with runner.held(), running(create_app(net, ServiceConfig(), runner=runner), ready=False) as url:
        assert runner.entered.wait(60)  # the warm-up image holds the (gated) device
        response = httpx.get(f"{url}/readyz")
        assert response.status_code == 503 and response.json() == {"ready": False}
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive all the same
        response = _post(url, _png(image), _png(hole))
        _refused(response, 503, "not ready yet")
        assert response.headers["retry-after"] == "1"
        runner.gate.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _check(_post(url, _png(image), _png(hole), postprocess="false"), _png(image), hole > 0, tmp_path, net, False)


def _refused(response, status, *words):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def test_every_fault_has_its_status_and_the_server_keeps_serving(net, tmp_path):
    config = ServiceConfig(max_pixels=64 * 96, max_body_bytes=12_000, max_queue=2)
    image, hole = _photo_bgr("chelsea", 40, 60), _mask(40, 60, (10, 10, 12, 12))
    good = lambda url: _check(_post(url, _png(image), _png(hole), postprocess="false"), _png(image), hole > 0,
                              tmp_path, net, False)
    with running(create_app(net, config)) as url:
        post = lambda *a, **k: _post(url, *a, **k)
        _refused(httpx.post(f"{url}/v1/complete", data={"rects": "1,1,5,5"}), 400, "no image")
        _refused(post(b"\x89PNG\r\n\x1a\n garbage", rects="1,1,5,5"), 400, "could not read an image",
                 "the uploaded image 'photo.png'")
        _refused(post(_png(image), _png(np.zeros((10, 10), np.uint8))), 400, "mask", "10 x 10", "60 x 40")
        _refused(post(_png(image), b"garbage"), 400, "could not read a mask")
        _refused(post(_png(image), rects="1,2,3"), 400, "rects", "four integers", "'1,2,3'")
        _refused(post(_png(image), rects="1,1,0,5"), 400, "w, h > 0")
        _refused(post(_png(image), rects="100,100,5,5"), 400, "wholly outside", "60 x 40")
        _refused(post(_png(image)), 400, "no holes")
        _refused(post(_png(image), rects="1,1,5,5", postprocess="maybe"), 400, "postprocess", "'maybe'")
        _refused(post(_png(image), rects="1,1,5,5", rect="1,1,5,5"), 400, "unknown field", "rect")
        good(url)
        big = _png(np.full((80, 100, 3), 128, np.uint8))  # compresses well: under the body limit
        _refused(post(big, rects="1,1,5,5"), 413, "100 x 80 = 8000 pixels", "at most 6144", "max_pixels")
        _refused(post(_png(image), _png(_mask(80, 100))), 413, "mask", "at most 6144")
        noise = _png(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))  # > 12 kB
        assert len(noise) > 12_000 > len(_png(image)) + len(_png(hole)) + 1000
        _refused(post(noise, rects="1,1,5,5"), 413, "at most 12000", "max_body_bytes")

        def chunks():  # no Content-Length: counted as it arrives
            yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(100):
                yield b"\0" * 1000

        response = httpx.post(f"{url}/v1/complete", content=chunks(),
                              headers={"content-type": "multipart/form-data; boundary=x"}, timeout=TIMEOUT)
        _refused(response, 413, "over 12000 bytes")
        good(url)
        assert metric(url, "glcic_fast_requests_total", 'status="413"') == 4
        assert metric(url, "glcic_fast_requests_total", 'status="400"') == 10


def test_a_full_queue_answers_503_with_retry_after(net, tmp_path):
    runner = GatedRunner(net)
    image, hole = _photo_bgr("coffee", 40, 60), _mask(40, 60, (10, 10, 12, 12))
    with running(create_app(net, ServiceConfig(max_queue=1), runner=runner)) as url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool, runner.held():
            held = pool.submit(_post, url, _png(image), _png(hole), postprocess="false")
            assert runner.entered.wait(60)
            response = _post(url, _png(image), _png(hole))
            _refused(response, 503, "queue is full", "max_queue 1")
            assert response.headers["retry-after"] == "1"
            runner.gate.set()
            _check(held.result(), _png(image), hole > 0, tmp_path, net, False)
        _check(_post(url, _png(image), _png(hole), postprocess="false"), _png(image), hole > 0, tmp_path, net, False)


def test_a_client_that_goes_away_has_its_work_dropped(net, tmp_path):
    runner = GatedRunner(net)
    image, hole = _photo_bgr("coffee", 40, 60), _mask(40, 60, (10, 10, 12, 12))
    other = _photo_bgr("chelsea", 44, 64)  # its own crop size: it can be told apart in the runner
    with running(create_app(net, ServiceConfig(max_wait_ms=0), runner=runner)) as url:
        runner.shapes.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool, runner.held():
            held = pool.submit(_post, url, _png(image), _png(hole), postprocess="false")
            assert runner.entered.wait(60)
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                _post(url, _png(other), rects="5,5,10,10", timeout=1.0)
            deadline = time.monotonic() + 30
            while metric(url, "glcic_fast_requests_total", 'status="499"') < 1:
                assert time.monotonic() < deadline, "the server never noticed the client leave"
                time.sleep(0.05)
            assert metric(url, "glcic_fast_queue_depth") == 0  # its crop left the queue
            runner.gate.set()
            _check(held.result(), _png(image), hole > 0, tmp_path, net, False)
        assert all(shape[-2:] != (44, 64) for shape in runner.shapes)  # never ran


def test_out_of_memory_in_a_batch_is_split_not_500(net, tmp_path):
    from glcic_fast.inference.completion import run_network

    def forward(x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return run_network(net, x)

    runner = GatedRunner(net, forward)
    images = [_photo_bgr("coffee", 40, 60), _photo_bgr("chelsea", 40, 60), _photo_bgr("rocket", 40, 60)]
    hole = _mask(40, 60, (10, 10, 12, 12))
    with running(create_app(net, ServiceConfig(max_batch=4, max_wait_ms=0), runner=runner)) as url:
        with concurrent.futures.ThreadPoolExecutor(3) as pool, runner.held():
            first = pool.submit(_post, url, _png(images[0]), _png(hole), postprocess="false")
            assert runner.entered.wait(60)
            rest = [pool.submit(_post, url, _png(im), _png(hole), postprocess="false") for im in images[1:]]
            deadline = time.monotonic() + 60
            while metric(url, "glcic_fast_queue_depth") < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            runner.gate.set()
            for image, response in zip(images, [first.result()] + [f.result() for f in rest]):
                _check(response, _png(image), hole > 0, tmp_path, net, False)
        assert (2, 4, 40, 60) in runner.shapes  # the batch of two was tried, then split
