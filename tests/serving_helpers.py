"""Helpers of the serving tests: a runner with a gate that holds batches until a test lets
them go; one sample of /metrics. A plain module, not a conftest.py, because test files
import it by name and another folder's conftest.py may hold that name first."""

import contextlib
import threading


class GatedRunner:
    """Runs batches through the network, recording their shapes; while ``gate`` is clear,
    each batch waits in the runner (a busy device, deterministically)."""

    def __init__(self, net, forward=None):
        from glcic_fast.inference.completion import run_network

        self.net = net
        self.forward = forward or (lambda x: run_network(net, x))
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.shapes = []

    @contextlib.contextmanager
    def held(self):
        """Batches wait in the runner within the block, until ``gate.set()`` (at the latest
        when the block ends, so that a failing test does not leave the server hanging)."""
        self.entered.clear()
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        self.entered.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return self.forward(x)


def metric(url, name, labels=""):
    """A sample's value from /metrics (0 when absent)."""
    import httpx

    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            rendered = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            if sample.name == name and rendered == labels:
                return sample.value
    return 0.0
