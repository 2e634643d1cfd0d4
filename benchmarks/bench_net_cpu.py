"""Whole-network inference on the CPU: glcic_fast's eval net vs the reference, eager.

512 x 512, batch 1, fp32, same weights, both in eval mode under inference_mode. Run
`pytest benchmarks/bench_net_cpu.py --benchmark-only`; the two rows of the group
`cpu-net-512` are measured side by side in one run, so their ratio is the speed-up.
"""

import pytest
import torch

from glcic_fast import CompletionNet
from glcic_fast.reference import ReferenceCompletionNet

SIZE = 512


@pytest.fixture(scope="module")
def nets_and_input():
    torch.manual_seed(0)
    net = CompletionNet().eval()
    reference = ReferenceCompletionNet()
    reference.load_state_dict(net.state_dict())
    reference.eval()
    x = torch.rand(1, 4, SIZE, SIZE)
    with torch.inference_mode():
        max_diff = (net(x) - reference(x)).abs().max().item()
    return net, reference, x, max_diff


def _extra_info(benchmark, max_diff):
    benchmark.extra_info.update({"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "size": SIZE, "dtype": "float32", "max_abs_diff_to_reference": max_diff})


@pytest.mark.benchmark(group="cpu-net-512", min_rounds=3, warmup=True, warmup_iterations=1)
def test_reference_eager(benchmark, nets_and_input):
    _, reference, x, _ = nets_and_input
    _extra_info(benchmark, 0.0)
    with torch.inference_mode():
        benchmark(reference, x)


@pytest.mark.benchmark(group="cpu-net-512", min_rounds=3, warmup=True, warmup_iterations=1)
def test_glcic_fast_eval(benchmark, nets_and_input):
    net, _, x, max_diff = nets_and_input
    assert max_diff <= 1e-4, "a fast result that is wrong is not a result"
    _extra_info(benchmark, max_diff)
    with torch.inference_mode():
        benchmark(net, x)
