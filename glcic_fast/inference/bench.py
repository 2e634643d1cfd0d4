"""The fast net against the reference on this machine: time per image and max difference.

Used by ``glcic-fast bench``. Both run in eval mode under inference_mode with the same
weights, on the GPU when there is one: the reference as the eager PyTorch graph users
already have (NCHW, separate conv, BatchNorm and ReLU), glcic_fast with BN folded and each
layer one fused op. With trained weights (given, or the demo checkpoint bundled in
``examples/``) it can also write the completed example: object removal, the mission patch
and the name badge taken off the astronaut's suit (the mask of the README's figure,
examples/object_removal.png, which scripts/make_object_removal_figure.py makes from the
same files).
"""

import copy
import os
import time

import torch

from glcic_fast.devices import default_device
from glcic_fast.imageio import read_rgb
from glcic_fast.inference.masks import hole_mask
from glcic_fast.nn.completion_net import CompletionNet
from glcic_fast.nn.reference import ReferenceCompletionNet

# The source tree's examples/ (an editable install, as scripts/setup.sh makes), two levels above here.
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
#: The demonstration checkpoint trained by scripts/train_demo.sh (absent until one is bundled).
DEMO_WEIGHTS = os.path.join(EXAMPLES, "demo_completionnet.safetensors")
#: The bundled example and its mask: white boxes over the mission patch and the name badge.
EXAMPLE_IMAGE = os.path.join(EXAMPLES, "astronaut.png")
EXAMPLE_MASK = os.path.join(EXAMPLES, "astronaut_mask.png")


def _synchronize():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_seconds(fn, repeats):
    fn()  # warm-up: oneDNN / cuDNN pick their algorithms on the first call
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare(net: CompletionNet, image: torch.Tensor, mask: torch.Tensor, repeats: int = 3,
            dtype: torch.dtype = torch.float32):
    """Rows of (what, seconds per image, max |difference| to the float32 reference) for
    one completion of ``image`` / ``mask`` (3 x H x W, 1 x H x W; H, W multiples of 4),
    both networks in ``dtype`` on the net's device (``net`` itself is left as it is)."""
    device = next(net.parameters()).device
    reference = ReferenceCompletionNet(net.bn_after_relu, net.output_activation).to(device)
    reference.load_state_dict(net.state_dict())
    reference.eval()
    net.eval()
    image, mask = image.to(device), mask.to(device)
    hole = (mask > 0.5).to(image.dtype)[None]
    x = net.prepare_input(image[None], hole)
    with torch.inference_mode():
        truth = reference(x).float()
        if dtype != next(net.parameters()).dtype:
            net = copy.deepcopy(net).to(dtype)
        reference, x = reference.to(dtype), x.to(dtype)
        rows = []
        for name, model in (("reference (eager, NCHW, conv + BN + ReLU)", reference),
                            (f"glcic_fast ({net.backend or 'auto'} backend, BN folded, fused ops)", net)):
            diff = (model(x).float() - truth).abs().max().item()
            rows.append((name, _median_seconds(lambda: model(x), repeats), diff))
    return rows


def format_table(rows, size, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    t_ref = rows[0][1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"completion of one {size[1]} x {size[0]} image, {str(dtype).split('.')[-1]}, on {where}; "
             "max |diff| is to the float32 reference",
             f"{'network':<58} {'s / image':>10} {'speed-up':>9} {'max |diff|':>11}"]
    for name, seconds, diff in rows:
        lines.append(f"{name:<58} {seconds:>10.3f} {t_ref / seconds:>8.2f}x {diff:>11.2e}")
    return "\n".join(lines)


def run(weights=None, image_path=None, mask_path=None, repeats=3, device=None, output=None,
        dtype=torch.float32) -> str:
    """The table (and notes) ``glcic-fast bench`` prints. ``weights``: anything
    glcic_fast.load reads; default the bundled demo checkpoint if there is one, else a
    randomly initialised net (timings do not depend on the weights). ``output``: where to
    write the example's completion (post-processed, as ``glcic-fast complete`` does);
    written only with trained weights, since an untrained net's completion is noise.
    ``dtype``: the networks' precision (float16 / bfloat16 are for GPUs)."""
    from glcic_fast.inference.completion import complete_with
    from glcic_fast.imageio import write_image
    from glcic_fast.nn.weights import load

    device = default_device(device)
    image_path = image_path or EXAMPLE_IMAGE
    mask_path = mask_path or EXAMPLE_MASK
    if output is not None and any(os.path.exists(output) and os.path.samefile(output, p)
                                  for p in (image_path, mask_path)):
        raise ValueError(f"refusing to overwrite the input {output} with the completion")
    image = read_rgb(image_path)
    mask = hole_mask(*image.shape[-2:], mask_path, image=image_path)
    weights = weights or (DEMO_WEIGHTS if os.path.exists(DEMO_WEIGHTS) else None)
    if weights:
        net = load(weights).to(device)
        notes = [f"weights: {net.weights_source}"]
    else:
        torch.manual_seed(0)
        net = CompletionNet(bn_after_relu=False).to(device)  # the authors' order: BN folded, as labelled
        notes = ["weights: random initialisation (no trained checkpoint is bundled yet); timings do not depend on it"]
    h, w = (s - s % 4 for s in image.shape[-2:])  # the timed forward takes the net's own sizes
    table = format_table(compare(net, image[:, :h, :w], mask[:, :h, :w], repeats, dtype), (h, w), device, dtype)
    if output is not None:
        if weights:
            net = net.to(dtype)
            completed = complete_with(net, image.to(device, dtype), mask.to(device, dtype), postprocess=True)
            write_image(output, completed.cpu())
            notes.append(f"completed {os.path.basename(image_path)} -> {output}")
        else:
            notes.append(f"{output} not written: a randomly initialised net's completion is noise "
                         "(give --weights, or bundle the demo checkpoint: scripts/train_demo.sh)")
    return "\n".join([table] + notes)
