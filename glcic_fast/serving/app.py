"""The HTTP app (FastAPI): ``POST /v1/complete``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``, over one :class:`glcic_fast.inference.engine.Engine`, and the object-
removal web page at ``GET /`` (``static/index.html``; its script and style sheet under
``GET /static/``, read from this package, no external resources): open a photo, paint
what should go, and the page POSTs it with its mask to ``/v1/complete``.

``POST /v1/complete`` takes multipart/form-data: ``image`` (a file in any format the CLI
reads), and ``mask`` (a file of the image's size, white = fill) and/or ``rects`` (a field
``x,y,w,h;x,y,w,h``; clipped to the image like the CLI's ``--rect``), optionally
``postprocess`` (``true``/``false``, default ``true`` as the CLI). It answers 200 with
``image/png`` of the input's size and channels (16-bit inputs as 16-bit PNG), equal to the
input outside the holes; errors are JSON ``{"error": "..."}``:

- 400: no image, an undecodable image or mask, a mask of another size, bad ``rects``, an
  unknown field, a malformed body;
- 413: a body over ``max_body_bytes`` or an image (or mask) over ``max_pixels``, naming
  the limit;
- 503 with ``Retry-After``: ``max_queue`` requests already admitted, or not ready yet
  (warming up) or shutting down;
- 499 (counted in the metrics only; nobody is left to read it): the client disconnected
  before the answer; the image's crops that had not run are dropped.

Files are decoded by :mod:`glcic_fast.imageio` and the holes made by
:func:`glcic_fast.inference.masks.hole_mask`, as for the command line, from the uploaded
bytes in memory (:class:`glcic_fast.imageio.Upload`, named in messages by its field and
file name); the answer is encoded in memory too.
"""

import asyncio
import importlib.resources
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from glcic_fast.serving.config import ServiceConfig
from glcic_fast.serving.metrics import Metrics

log = logging.getLogger("glcic_fast.serving")

#: The fields POST /v1/complete reads.
FIELDS = ("image", "mask", "rects", "postprocess")
#: Seconds a refused client is asked to wait (Retry-After).
RETRY_AFTER = 1
#: How often a waiting request checks that its client is still there (seconds).
DISCONNECT_POLL = 0.05
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class Refused(Exception):
    """A request answered with an error status and a one-line message."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class _BodyTooLarge(Exception):
    pass


def parse_rects(text: str):
    """``x,y,w,h;x,y,w,h`` -> [(x, y, w, h), ...]; ValueError saying what was wrong."""
    from glcic_fast.inference.masks import parse_rect

    rects = []
    for part in (p.strip() for p in text.split(";")):
        if part:
            try:
                rects.append(parse_rect(part))
            except ValueError as exc:
                raise ValueError(f"rects: {exc} in {text!r} (expected x,y,w,h;x,y,w,h)") from None
    if not rects:
        raise ValueError(f"rects: no rectangle in {text!r} (expected x,y,w,h;x,y,w,h)")
    return rects


def _limited(receive, limit: int):
    """``receive`` that raises _BodyTooLarge once the body passes ``limit`` bytes (a body
    sent without Content-Length, or with a false one)."""
    received = 0

    async def limited():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge()
        return message

    return limited


class Service:
    """The app's state: the engine, the metrics, the admission count."""

    def __init__(self, net, config: ServiceConfig, runner=None):
        self.net, self.config, self.runner = net, config, runner
        self.metrics = Metrics()
        self.engine = None
        self.ready = threading.Event()
        self.draining = False
        self.in_flight = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        from glcic_fast.inference.engine import Engine

        c = self.config
        self.engine = Engine(self.net, device=c.device, dtype=c.dtype, max_batch=c.max_batch,
                             max_wait_ms=c.max_wait_ms, min_fill=c.min_fill, runner=self.runner,
                             on_batch=self.metrics.on_batch)
        self.metrics.queue_depth.set_function(self.engine.queue_depth)
        threading.Thread(target=self._warm_up, name="glcic-warm-up", daemon=True).start()

    def _warm_up(self):
        """One small image through the engine: the backends' first-call work (kernel
        compilation, algorithm choice) happens before /readyz says ready."""
        import torch

        mask = torch.zeros(1, 64, 64)
        mask[:, 24:40, 24:40] = 1
        try:
            self.engine.submit(torch.full((3, 64, 64), 0.5), mask).result()
        except Exception:
            log.exception("glcic_fast: warm-up failed; /readyz stays 503")
            return
        self.ready.set()

    def stop(self):
        """Called once the server has stopped accepting and answered what was in flight."""
        self.draining = True
        self.ready.clear()
        if self.engine is not None:
            self.engine.close()

    # -- POST /v1/complete --------------------------------------------------------------

    async def complete(self, request: Request) -> Response:
        start = time.perf_counter()
        status, admitted = 500, False
        try:
            if self.draining or not self.ready.is_set():
                raise Refused(503, "shutting down" if self.draining else "not ready yet (warming up)",
                              {"Retry-After": str(RETRY_AFTER)})
            if self.in_flight >= self.config.max_queue:
                raise Refused(503, f"the queue is full: {self.in_flight} requests in flight (max_queue "
                              f"{self.config.max_queue}); retry later", {"Retry-After": str(RETRY_AFTER)})
            self.in_flight += 1
            self.metrics.in_flight.inc()
            admitted = True
            body = await self._complete(request)
            status = 200
            self.metrics.latency.observe(time.perf_counter() - start)
            return Response(body, media_type="image/png")
        except Refused as r:
            status = r.status
            return JSONResponse({"error": r.message}, status_code=r.status, headers=r.headers)
        except ClientDisconnect:
            status = 499
            return Response(status_code=499)
        except asyncio.CancelledError:  # Ray Serve cancels the request of a client that went away
            status = 499
            raise
        except Exception as exc:  # a bug: logged with its traceback, answered in one line
            log.exception("glcic_fast: POST /v1/complete failed")
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
        finally:
            if admitted:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
            self.metrics.requests.labels(str(status)).inc()

    async def _complete(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise Refused(413, f"the body is {int(length)} bytes; this server takes at most {limit} (max_body_bytes)")
        limited = Request(request.scope, _limited(request.receive, limit))
        try:
            form = await limited.form(max_files=2, max_fields=len(FIELDS))
        except _BodyTooLarge:
            raise Refused(413, f"the body is over {limit} bytes, the most this server takes (max_body_bytes)")
        except MultiPartException as exc:
            raise Refused(400, f"malformed multipart/form-data body: {exc.message}")
        try:
            unknown = sorted(set(form.keys()) - set(FIELDS))
            if unknown:
                raise Refused(400, f"unknown field(s) {', '.join(unknown)}; POST /v1/complete takes "
                              f"{', '.join(FIELDS)}")
            parts = {}
            for name in FIELDS:
                value = form.get(name)
                if isinstance(value, UploadFile):
                    parts[name] = (await value.read(), value.filename or name)
                elif value is not None:
                    parts[name] = value
        finally:
            await form.close()
        future = await run_in_threadpool(self._submit, parts)
        waiter = asyncio.wrap_future(future)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL)
                if done:
                    return waiter.result()
                if await limited.is_disconnected():
                    raise ClientDisconnect()
        finally:
            future.cancel()  # a no-op once done; else (disconnect, cancelled task) its crops are dropped

    def _submit(self, parts: dict):
        """Decodes and checks the parts (in a worker thread) and submits the image; returns
        the engine's future of the PNG bytes."""
        from glcic_fast.imageio import Upload, array_to_tensor, encode_image, image_size, read_image_array
        from glcic_fast.inference.masks import hole_mask

        if "image" not in parts or isinstance(parts["image"], str):
            raise Refused(400, "no image: send the image as a file in the multipart field 'image'")
        if "mask" not in parts and "rects" not in parts:
            raise Refused(400, "no holes: send a 'mask' file (white = fill) or a 'rects' field x,y,w,h;x,y,w,h")
        if isinstance(parts.get("mask"), str):
            raise Refused(400, "'mask' must be a file (white = fill), not a text field")
        for name in ("rects", "postprocess"):
            if name in parts and not isinstance(parts[name], str):
                raise Refused(400, f"'{name}' must be a text field, not a file")
        postprocess = parts.get("postprocess", "true").strip().lower()
        if postprocess not in _TRUE + _FALSE:
            raise Refused(400, f"postprocess: expected true or false, got {parts['postprocess']!r}")

        # Decoded from memory, named in messages as the client knows them.
        paths = {name: Upload(parts[name][0], f"the uploaded {name} {parts[name][1]!r}")
                 for name in ("image", "mask") if name in parts}
        limit = self.config.max_pixels
        try:
            for name, path in paths.items():
                try:
                    w, h = image_size(path)
                except ValueError:
                    if name == "image":
                        raise
                    continue  # an unreadable mask: hole_mask says so, as a mask
                if w * h > limit:
                    raise Refused(413, f"the {name} is {w} x {h} = {w * h} pixels; this server takes at most "
                                  f"{limit} (max_pixels)")
            data = read_image_array(paths["image"])
            height, width = data.shape[:2]
            if width * height > limit:  # a header that Pillow does not read: decoded first
                raise Refused(413, f"the image is {width} x {height} = {width * height} pixels; this server "
                              f"takes at most {limit} (max_pixels)")
            rects = parse_rects(parts["rects"]) if "rects" in parts else ()
            mask = hole_mask(height, width, paths.get("mask"), rects, image=paths["image"], keep_8bit=True)
        except ValueError as exc:
            raise Refused(400, str(exc))
        self.metrics.pixels_received.inc(width * height)
        return self.engine.submit(array_to_tensor(data, keep_8bit=True), mask, postprocess=postprocess in _TRUE,
                                  then=lambda image: encode_image(image, ".png", data.dtype))


def create_app(net, config: ServiceConfig = ServiceConfig(), *, runner=None) -> FastAPI:
    """The app around ``net`` (a CompletionNet; converted to ``config``'s device and dtype).
    ``runner``: the engine's batch runner (tests put a gate there)."""
    service = Service(net, config, runner)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="glcic_fast", summary="GLCIC image completion with cross-request batching",
                  lifespan=lifespan)
    app.state.service = service
    # The page is read once here; its relative links (static/..., v1/complete) keep working
    # when the app is mounted under a prefix.
    page = (importlib.resources.files(__package__) / "static" / "index.html").read_text("utf-8")
    app.mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def web_page():
        """The object-removal page."""
        return HTMLResponse(page)

    @app.post("/v1/complete", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the completed image"}})
    async def complete(request: Request):
        """Fill the holes of an image (multipart/form-data: image, mask and/or rects,
        postprocess)."""
        return await service.complete(request)

    @app.get("/healthz")
    def healthz():
        """Alive: the engine's dispatcher is running."""
        alive = service.engine is not None and service.engine.alive()
        return JSONResponse({"alive": alive}, status_code=200 if alive else 503)

    @app.get("/readyz")
    def readyz():
        """Ready: weights loaded, the first image completed, not shutting down."""
        ready = service.ready.is_set() and not service.draining
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": str(RETRY_AFTER)})

    @app.get("/metrics")
    def metrics():
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    return app
