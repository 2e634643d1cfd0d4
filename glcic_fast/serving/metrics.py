"""The service's Prometheus metrics, in a registry of their own (one per app, so that
several apps in one process, as in the tests, do not share counters)."""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Request latency buckets (seconds): a small crop on a GPU to a large image on a CPU.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
#: Crops per forward.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glcic_fast_requests", "POST /v1/complete requests by HTTP status (499: the "
                                "client went away before the answer)", ["status"], registry=r)
        self.latency = Histogram("glcic_fast_request_seconds", "Seconds from a request's arrival to its 200 answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("glcic_fast_batch_crops", "Crops per network forward", buckets=BATCH_BUCKETS,
                               registry=r)
        self.queue_depth = Gauge("glcic_fast_queue_depth", "Crops waiting for the network", registry=r)
        self.in_flight = Gauge("glcic_fast_requests_in_flight", "Requests admitted and not yet answered",
                               registry=r)
        self.pixels_received = Counter("glcic_fast_pixels_received", "Pixels of the images accepted", registry=r)
        self.pixels_computed = Counter("glcic_fast_pixels_computed", "Pixels the network ran on (crops with "
                                       "their halo, grown to their batch's size; the whole image where ROI "
                                       "does not pay)", registry=r)

    def on_batch(self, crops: int, pixels: int):
        self.batch.observe(crops)
        self.pixels_computed.inc(pixels)

    def exposition(self):
        """(body, content type) of the /metrics answer."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
