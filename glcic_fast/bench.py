"""The fast net against the reference on this machine: time per image and max difference.

Used by ``glcic-fast bench``. Both run in eval mode under inference_mode with the same
weights: the reference as the eager PyTorch graph users already have (NCHW, separate
conv, BatchNorm and ReLU), glcic_fast with BN folded and each layer one fused op.
"""

import os
import time

import torch

from .imageio import read_mask, read_rgb
from .model import CompletionNet
from .reference import ReferenceCompletionNet

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _median_seconds(fn, repeats):
    fn()  # warm-up: oneDNN / cuDNN pick their algorithms on the first call
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare(net: CompletionNet, image: torch.Tensor, mask: torch.Tensor, repeats: int = 3):
    """Rows of (what, seconds per image, max |difference| to the reference) for one
    completion of ``image`` / ``mask`` (3 x H x W, 1 x H x W; H, W multiples of 4)."""
    reference = ReferenceCompletionNet(net.bn_after_relu).to(next(net.parameters()).device)
    reference.load_state_dict(net.state_dict())
    reference.eval()
    net.eval()
    hole = (mask > 0.5).to(image.dtype)[None]
    x = net.prepare_input(image[None], hole)
    with torch.inference_mode():
        want = reference(x)
        got = net(x)
        t_ref = _median_seconds(lambda: reference(x), repeats)
        t_fast = _median_seconds(lambda: net(x), repeats)
    diff = (got - want).abs().max().item()
    return [("reference (eager, NCHW, conv + BN + ReLU)", t_ref, 0.0),
            (f"glcic_fast ({net.backend or 'auto'} backend, BN folded, fused ops)", t_fast, diff)]


def format_table(rows, size) -> str:
    t_ref = rows[0][1]
    lines = [f"completion of one {size[1]} x {size[0]} image, fp32, {torch.get_num_threads()} threads, "
             f"device {'cuda' if torch.cuda.is_available() else 'cpu'}",
             f"{'network':<58} {'s / image':>10} {'speed-up':>9} {'max |diff|':>11}"]
    for name, seconds, diff in rows:
        lines.append(f"{name:<58} {seconds:>10.3f} {t_ref / seconds:>8.2f}x {diff:>11.2e}")
    return "\n".join(lines)


def run(weights=None, image_path=None, mask_path=None, repeats=3) -> str:
    from .weights import load

    image = read_rgb(image_path or os.path.join(EXAMPLES, "astronaut.png"))
    mask = read_mask(mask_path or os.path.join(EXAMPLES, "astronaut_mask.png"))
    h, w = (s - s % 4 for s in image.shape[-2:])
    image, mask = image[:, :h, :w], mask[:, :h, :w]
    if weights:
        net = load(weights)
        note = f"weights: {net.weights_source}"
    else:
        torch.manual_seed(0)
        net = CompletionNet()
        note = "weights: random initialisation (no trained checkpoint is bundled yet); timings do not depend on it"
    return format_table(compare(net, image, mask, repeats), image.shape[-2:]) + "\n" + note
