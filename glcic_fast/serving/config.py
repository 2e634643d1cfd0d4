"""The service's settings, importable without the serve extra (the CLI's ``--help`` reads
the defaults here)."""

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class ServiceConfig:
    """What ``glcic-fast serve`` and the Ray deployment configure.

    - ``device``, ``dtype``: where and in what precision the network runs.
    - ``max_batch``: most crops in one forward; ``max_wait_ms``: how long the oldest waiting
      crop waits for others of its size before its batch runs anyway (latency traded for
      fuller batches; a busy device batches what queued meanwhile regardless).
    - ``max_pixels``: the largest image (or mask) taken, width x height, read from the
      file's header before decoding; larger: 413.
    - ``max_body_bytes``: the largest request body, checked against Content-Length and
      counted as it arrives; larger: 413.
    - ``max_queue``: most requests in flight (decoding, waiting, running, encoding); more:
      503 with Retry-After, at once, before the body is read.
    - ``min_fill``: see :class:`glcic_fast.inference.engine.Engine` (None: by device).
    """
    device: Optional[str] = None
    dtype: str = "float32"
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_pixels: int = 4096 * 4096
    max_body_bytes: int = 64 << 20
    max_queue: int = 64
    min_fill: Optional[float] = None

    def __post_init__(self):
        for name in ("max_batch", "max_pixels", "max_body_bytes", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")

    def as_dict(self) -> dict:
        return asdict(self)
