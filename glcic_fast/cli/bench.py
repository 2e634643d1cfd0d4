"""``glcic-fast bench``: the fast net against the reference on this machine (the work is
in glcic_fast.inference.bench); with ``-o``, the bundled example's object removal."""

import argparse

from glcic_fast.cli.common import UsageError, check_writable_extension, pick_device


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--weights", help="weights to load (anything glcic_fast.load reads); default: the bundled "
                   "demo checkpoint if there is one, else a random initialisation")
    p.add_argument("--image", help="image to complete (default: the bundled examples/astronaut.png)")
    p.add_argument("--mask", help="mask image, white = fill (default: the bundled examples/astronaut_mask.png, "
                   "which removes the mission patch and the name badge from the astronaut's suit)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per network (median is shown)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="both networks' precision (default float32; half precision is for GPUs)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="also write the completed image here (replaced if it exists; trained weights only)")


def run(args):
    import torch

    from glcic_fast.inference.bench import run as bench
    from glcic_fast.nn.weights import WeightsError

    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.output:
        check_writable_extension(args.output)
    try:
        print(bench(weights=args.weights, image_path=args.image, mask_path=args.mask, repeats=args.repeats,
                    device=pick_device(args, 1, 0), output=args.output, dtype=getattr(torch, args.dtype)))
    except (WeightsError, OSError, ValueError) as exc:
        raise UsageError(str(exc))
    return 0
