"""``glcic-fast serve``: the HTTP service (FastAPI on uvicorn, or Ray Serve with ``--ray``).

    glcic-fast serve --weights w.safetensors --port 8000
    curl -F image=@photo.jpg -F rects=120,80,64,48 http://127.0.0.1:8000/v1/complete -o out.png

http://127.0.0.1:8000/ is a web page for the same: open a photo, paint over an object,
remove it, compare, download. At start-up the command prints that address.

Like ``glcic-fast complete`` it refuses to start without weights (``--weights`` or
``GLCIC_FAST_WEIGHTS``) unless ``--random-weights`` asks for an untrained network. SIGTERM
(or Ctrl-C) stops accepting connections, answers the requests in flight, then exits.
Needs the ``serve`` extra (``pip install 'glcic_fast[serve]'``; ``--ray`` also needs
``ray[serve]``). Exit status: 0 stopped, 2 usage errors (bad options, no or unreadable
weights, a missing extra), 1 anything unexpected.
"""

import argparse
import importlib.util
import os
import signal

from glcic_fast.cli import common, complete
from glcic_fast.cli.common import UsageError

DESCRIPTION = ("Serve the object-removal web page at /, and POST /v1/complete (multipart: image, mask and/or "
               "rects x,y,w,h;..., postprocess), "
               "/healthz, /readyz and /metrics, batching the crops of concurrent requests. SIGTERM drains "
               "the requests in flight, then exits.")

#: The modules the serve extra brings (module name: package name).
_EXTRA = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
          "multipart": "python-multipart"}


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser):
    from glcic_fast.serving.config import ServiceConfig

    d = ServiceConfig().as_dict()
    p.add_argument("--weights", metavar="PATH",
                   help="trained weights: anything glcic_fast.load reads (default: $GLCIC_FAST_WEIGHTS)")
    p.add_argument("--config", metavar="JSON", help="GLCIC-PyTorch's config.json (default: beside --weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="serve a randomly initialised network (noise; for timings and smoke tests)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for every "
                   "interface)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="network precision (default float32; half precision is for GPUs)")
    p.add_argument("--max-batch", type=_positive, default=d["max_batch"], metavar="N",
                   help=f"most crops in one forward ({d['max_batch']})")
    p.add_argument("--max-wait-ms", type=float, default=d["max_wait_ms"], metavar="T",
                   help=f"how long a crop waits for others of its size to fill a batch ({d['max_wait_ms']} ms)")
    p.add_argument("--max-pixels", type=_positive, default=d["max_pixels"], metavar="P",
                   help=f"largest image (or mask) taken, in pixels; larger: 413 ({d['max_pixels']})")
    p.add_argument("--max-body-bytes", type=_positive, default=d["max_body_bytes"], metavar="B",
                   help=f"largest request body; larger: 413 ({d['max_body_bytes']})")
    p.add_argument("--max-queue", type=_positive, default=d["max_queue"], metavar="Q",
                   help=f"most requests in flight; more: 503 with Retry-After ({d['max_queue']})")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve (a local Ray, or the cluster in $RAY_ADDRESS): one replica per "
                        "GPU, autoscaled (see glcic_fast/serving/ray_app.py)")


def _check_extra(ray: bool):
    modules = dict(_EXTRA, **({"ray.serve": "ray[serve]"} if ray else {}))
    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # "ray.serve" without ray
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise UsageError(f"glcic-fast serve needs {', '.join(missing)}: pip install 'glcic_fast[serve]'"
                         + (" 'ray[serve]'" if ray else ""))


def _page_url(host: str, port: int) -> str:
    """The web page's address for a browser on this machine (a wildcard address listens
    everywhere but is not one to browse to)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/"


def run(args):
    import torch

    from glcic_fast.serving.config import ServiceConfig

    _check_extra(args.ray)
    if args.max_wait_ms < 0:
        raise UsageError(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    config = ServiceConfig(device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, max_pixels=args.max_pixels,
                           max_body_bytes=args.max_body_bytes, max_queue=args.max_queue)
    if args.ray:
        # The replicas load the weights on their own devices; loaded here on the CPU first,
        # so that bad weights stop the command before Ray starts.
        complete._net(args, torch.device("cpu"))
        return _serve_on_ray(args, config)
    device = common.pick_device(args, 1, 0)
    net = complete._net(args, device)
    import uvicorn

    from glcic_fast.serving.app import create_app

    config = ServiceConfig(**dict(config.as_dict(), device=str(device)))
    # uvicorn handles SIGTERM and SIGINT: it stops accepting, answers the requests in flight
    # (no time limit), runs the app's shutdown (which drains the engine), then raises the
    # signal again for the handler it found. These handlers take it: the exit status is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if args.port:  # port 0: uvicorn's own log line names the port it picked
        print(f"glcic-fast serve: the web page is at {_page_url(args.host, args.port)}",
              flush=True)
    uvicorn.run(create_app(net, config), host=args.host, port=args.port, log_level="info")
    return 0


def _serve_on_ray(args, config):
    import threading

    import ray
    from ray import serve

    from glcic_fast.serving.ray_app import NAME, application

    weights = "random" if args.random_weights else (args.weights or os.environ.get("GLCIC_FAST_WEIGHTS"))
    ray.init(include_dashboard=False)  # the cluster in $RAY_ADDRESS, else a local one
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(os.path.abspath(weights) if weights != "random" else weights, config),
                  name=NAME, route_prefix="/")
        print(f"glcic-fast serve: Ray Serve application {NAME!r}; the web page is at "
              f"{_page_url(args.host, args.port)}", flush=True)
        stop.wait()
        serve.shutdown()  # each replica answers what it holds (graceful_shutdown_timeout_s), then stops
    finally:
        ray.shutdown()
    return 0
