"""``glcic-fast train``: arguments and entry point (kept free of heavy imports so that
``glcic-fast --help`` stays quick; the work is in glcic_fast.training).

Several GPUs on one machine::

    torchrun --standalone --nproc_per_node=4 -m glcic_fast.cli train DATA --out RUN ...

(``--batch-size`` is the global batch, split over the processes.)
"""

import argparse
import sys

# Exit statuses: 0 done, 1 error, 2 usage (argparse), 128 + signal when stopped by one
# (a checkpoint of the last finished step has been written).
EXIT_ERROR = 1


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("data", metavar="DATA", help="folder of training images (searched recursively: "
                                                "png, jpg, jpeg, webp, bmp, tif, ...)")
    p.add_argument("--out", metavar="RUN", required=True,
                   help="run folder: checkpoints, logs, config; must be empty or absent unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN from its newest readable checkpoint (or start it there "
                        "if it has none yet)")
    p.add_argument("--phase-steps", nargs=3, type=int, metavar=("TC", "TD", "TJ"),
                   help="steps of the completion, discriminator and joint phases (paper: 90000 10000 400000)")
    p.add_argument("--batch-size", type=int, help="global batch over all processes (paper: 96)")
    p.add_argument("--image-size", type=int, help="training crop side (paper: 256)")
    p.add_argument("--local-size", type=int, help="local discriminator patch side (paper: 128)")
    p.add_argument("--hole-range", nargs=2, type=int, metavar=("MIN", "MAX"),
                   help="hole width and height range, inclusive (paper: 96 128)")
    p.add_argument("--scale-range", nargs=2, type=int, metavar=("MIN", "MAX"),
                   help="shorter side before the crop, inclusive (default: S 1.5S; paper: 256 384)")
    p.add_argument("--device", metavar="DEV", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints (default 1000)")
    p.add_argument("--keep", type=int, metavar="K", help="checkpoints kept, newest first (default 3)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of initial weights, data order and "
                                                         "augmentation (default 0)")
    p.add_argument("--workers", type=int, metavar="W", help="data-loader processes per training process "
                                                            "(default 4)")
    p.add_argument("--alpha", type=float, help="weight of the adversarial loss (paper: 0.0004)")
    p.add_argument("--adversarial", choices=("non_saturating", "minimax"),
                   help="C's adversarial loss: -log D (default) or the paper's log(1 - D)")
    p.add_argument("--mse-reduction", choices=("mean", "sum"),
                   help="MSE over the hole: mean over the masked values (default) or their sum")
    p.add_argument("--lr", type=float, help="ADADELTA learning rate (default 1)")
    p.add_argument("--bn-after-relu", action="store_const", const=True,
                   help="conv -> ReLU -> BN blocks (GLCIC-PyTorch) instead of the paper's conv -> BN -> ReLU")
    p.add_argument("--output-activation", choices=("sigmoid", "hardtanh"),
                   help="the completion net's output layer: sigmoid (the paper's, default) or hardtanh (mmagic's "
                        "clamp to [-1, 1], its nets taking BGR in [-1, 1]; for --init with mmagic's weights)")
    p.add_argument("--disc-channels", nargs="+", type=int, metavar="C",
                   help="discriminator conv widths (default: 64 128 256 512 512 512)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"),
                   help="bf16 autocast: auto = on CUDA only (default)")
    p.add_argument("--precision", choices=("float32", "float64"),
                   help="float64 is for verification (DDP or resume against a reference) without float32 "
                        "rounding; default float32")
    p.add_argument("--deterministic", action="store_const", const=True,
                   help="deterministic kernels: bit-exact resume on CUDA too, somewhat slower")
    p.add_argument("--mean-pixel", nargs=3, type=float, metavar=("R", "G", "B"),
                   help="the data set's mean pixel in [0, 1] (default: computed over the data set once)")
    p.add_argument("--mean-images", type=int, metavar="N",
                   help="compute the mean pixel over a seeded random subset of N images")
    p.add_argument("--log-every", type=int, metavar="N", help="steps between loss rows (default 10)")
    p.add_argument("--image-every", type=int, metavar="N", help="steps between TensorBoard image grids "
                                                                "(default 1000)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False,
                   help="no TensorBoard events")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start the completion net from these weights (anything glcic_fast.load reads: the authors' "
                        ".t7 or converted .pth, a GLCIC-PyTorch checkpoint with its config.json beside it, glcic_fast "
                        ".safetensors) to fine-tune it; the discriminator and optimisers start fresh, the mean pixel "
                        "is the weights' (unless --mean-pixel), the block order must be theirs (--bn-after-relu for "
                        "GLCIC-PyTorch's); --phase-steps 0 TD TJ trains a discriminator for it first. A run's "
                        "checkpoint wins over --init on --resume (which may only repeat the run's own --init)")

    holes = p.add_argument_group(
        "holes", "The paper's rectangles (--hole-range), or free-form masks for object removal: blobs (filled "
                 "ellipses) and strokes (thick polylines, DeepFill v2's brush strokes) drawn at the crop's size, "
                 "each starting outside the hole so far; sizes are fractions of --image-size, counts inclusive "
                 "ranges. The local discriminator's patch is centred on the hole's bounding box, clipped inside the "
                 "image; the MSE and the discriminators see the mask itself.")
    holes.add_argument("--holes", choices=("rect", "free", "mixed"),
                       help="rect: the paper's rectangles (default); free: free-form masks; mixed: each sample "
                            "free-form with probability --free-probability, else a rectangle")
    holes.add_argument("--free-probability", type=float, metavar="P",
                       help="--holes mixed: probability of a free-form hole (default 0.5)")
    for option, kind, what in (
            ("--stroke-count", int, "strokes per mask (default 1 4)"),
            ("--stroke-vertices", int, "vertices per stroke, segments = vertices - 1; the direction turns by up to "
                                       "90 degrees at each (default 4 12)"),
            ("--stroke-width", float, "stroke width, fraction of the image side (default 0.05 0.15)"),
            ("--stroke-length", float, "stroke segment length, fraction of the image side (default 0.05 0.25)"),
            ("--blob-count", int, "blobs (ellipses) per mask, drawn before the strokes (default 0 2)"),
            ("--blob-size", float, "blob semi-axes, fraction of the image side (default 0.05 0.2)"),
            ("--free-area", float, "fraction of the image in a free-form hole, always within this range: a piece "
                                   "that would pass MAX is left out, strokes are added while under MIN "
                                   "(default 0.05 0.4)")):
        holes.add_argument(option, nargs=2, type=kind, metavar=("MIN", "MAX"), help=what)


#: argparse destination -> TrainConfig field, for options given on the command line.
_FIELDS = ("phase_steps", "batch_size", "image_size", "local_size", "hole_range", "scale_range", "device",
           "checkpoint_every", "keep", "seed", "workers", "alpha", "adversarial", "mse_reduction", "lr",
           "bn_after_relu", "output_activation", "disc_channels", "amp", "precision", "deterministic", "mean_pixel", "mean_images", "log_every",
           "image_every", "tensorboard", "progress", "init", "holes", "free_probability", "stroke_count",
           "stroke_vertices", "stroke_width", "stroke_length", "blob_count", "blob_size", "free_area")


def _given(args) -> dict:
    """The TrainConfig settings given on the command line."""
    return {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}


def config_from_args(args):
    """The TrainConfig of a new run from the options. (On --resume, ``run`` hands the
    options to glcic_fast.training.resume_run instead, which takes those not given from
    the run's checkpoint, the one it resumes from.)"""
    from glcic_fast.training.config import TrainConfig

    return TrainConfig(args.data, args.out, **_given(args))


def run(args) -> int:
    import logging
    import signal

    from glcic_fast.training import TrainingError, resume_run, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.resume:
            summary = resume_run(args.data, args.out, **_given(args))
        else:
            summary = train(config_from_args(args))
    except (TrainingError, ValueError, FileNotFoundError) as exc:
        print(f"glcic-fast train: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if summary["interrupted"]:
        return 128 + int(summary["signal"] or signal.SIGTERM)
    return 0
