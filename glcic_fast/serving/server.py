"""The app served by uvicorn in a background thread of this process (tests, benchmarks,
notebooks): ``with serving(app) as url: ...``."""

import contextlib
import threading
import time


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 120, ready: bool = True):
    """Serves ``app`` on ``host``:``port`` (0: a free port) until the block ends; yields the
    base URL once ``/readyz`` answers 200 (``ready=False``: once the server listens).
    Leaving the block stops the server as SIGTERM does: no new connections, the requests
    in flight answered, the engine drained."""
    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="glcic-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://{host}:{bound}"
        while ready and httpx.get(f"{url}/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not become ready in {timeout} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout)
