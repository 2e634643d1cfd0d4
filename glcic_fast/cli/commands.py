"""The ``glcic-fast`` command line.

``glcic-fast complete`` fills holes in one image or in a folder of images:

    glcic-fast complete photo.jpg --mask mask.png -o out.png --weights completionnet_places2.t7
    glcic-fast complete photo.jpg --rect 120,80,64,48 --rect 300,10,20,20 -o out.png --weights w.t7
    glcic-fast complete photos/ --masks masks/ -o completed/ --weights w.t7
    torchrun --nproc-per-node 4 -m glcic_fast.cli complete photos/ --masks masks/ -o completed/ --weights w.t7

Weights: ``--weights`` (anything ``glcic_fast.load`` reads) or the ``GLCIC_FAST_WEIGHTS``
environment variable. Without either the command stops with an error: a randomly
initialised network produces noise, and writing noise into files by accident helps no
one. ``--random-weights`` runs one anyway (for timings), with a warning.

Post-processing (the paper's Telea + Poisson blend) is on unless ``--no-postprocess``.
Inputs are never overwritten: the command refuses an output that is one of its inputs or
an output folder that is the input or mask folder, and refuses to replace existing
output files unless ``--overwrite``. Exit status: 0 done, 2 usage or input errors
(nothing written), 1 anything unexpected.
"""

import argparse
import os
import sys
import warnings

_LIST_LIMIT = 20


def _image_extensions():
    from glcic_fast.imageio import IMAGE_EXTENSIONS  # here, not at the top: --help stays quick

    return IMAGE_EXTENSIONS


class UsageError(Exception):
    """Bad arguments or inputs: reported in one message, exit status 2, nothing written."""


def _bench(args):
    from glcic_fast.inference.bench import run

    import torch

    from glcic_fast.nn.weights import WeightsError

    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.output:
        _check_writable_extension(args.output)
    try:
        print(run(weights=args.weights, image_path=args.image, mask_path=args.mask, repeats=args.repeats,
                  device=_device(args, 1, 0), output=args.output, dtype=getattr(torch, args.dtype)))
    except (WeightsError, OSError, ValueError) as exc:
        raise UsageError(str(exc))
    return 0


# -- helpers -------------------------------------------------------------------------------

def _listing(paths, limit=_LIST_LIMIT):
    shown = [f"  {p}" for p in paths[:limit]]
    if len(paths) > limit:
        shown.append(f"  ... and {len(paths) - limit} more")
    return "\n".join(shown)


def _parse_rect(text):
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x,y,w,h (four integers), got {text!r}")
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise argparse.ArgumentTypeError(f"a rectangle needs x, y >= 0 and w, h > 0, got {text!r}")
    return x, y, w, h


def _is_image(name):
    return name.lower().endswith(_image_extensions()) and not name.startswith(".")


def _same(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def _image_size(path):
    """(width, height) from the header when Pillow is there, else by decoding."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except ImportError:
        pass
    except Exception:  # Pillow cannot read it: let OpenCV try
        pass
    import cv2

    data = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if data is None:
        raise UsageError(f"cannot read {path} as an image")
    return data.shape[1], data.shape[0]


def _check_writable_extension(path):
    from glcic_fast.imageio import check_writable

    if not path.lower().endswith(_image_extensions()):
        raise UsageError(f"cannot write an image to {path}: use an image extension such as .png or .jpg")
    try:
        check_writable(path, channels=3)
    except ValueError as exc:
        raise UsageError(str(exc))


def _distributed():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _device(args, world, local_rank):
    import torch

    if world > 1:
        if args.device not in (None, "cuda"):
            raise UsageError(f"under torchrun each process uses cuda:LOCAL_RANK; --device {args.device} is not allowed")
        if not torch.cuda.is_available():
            raise UsageError("torchrun with several processes needs CUDA GPUs (one per process)")
        if not 0 <= local_rank < torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             "GPU(s): start at most one process per GPU (torchrun --nproc-per-node)")
        # The process's current device too, so that nothing lands on cuda:0 by default (an
        # extra CUDA context there per process) and Triton launches on this GPU.
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"bad --device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    return device


def _net(args, device):
    from glcic_fast.inference.api import WEIGHTS_ENV, get_net
    from glcic_fast.nn.weights import WeightsError

    weights = args.weights or os.environ.get(WEIGHTS_ENV)
    if args.random_weights:
        if args.weights:
            raise UsageError("--random-weights and --weights exclude each other")
        print("glcic-fast: warning: the network is randomly initialised (--random-weights): "
              "the outputs are noise, not completions", file=sys.stderr)
        weights = "random"
    elif not weights:
        raise UsageError("no weights: pass --weights PATH (the authors' .t7, a GLCIC-PyTorch .pth with its "
                         f"config.json beside it, or glcic_fast .safetensors) or set {WEIGHTS_ENV}; "
                         "--random-weights runs an untrained network (noise, for timings only)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the random-init warning: printed above
            return get_net(weights, device, args.dtype, args.config)
    except (WeightsError, OSError, ValueError) as exc:
        raise UsageError(f"cannot load weights {weights}: {exc}")


# -- single image ------------------------------------------------------------------------------

def _complete_one(args, device):
    import time

    import torch

    from glcic_fast.inference.batching import rect_mask
    from glcic_fast.inference.completion import complete_with
    from glcic_fast.imageio import array_to_tensor, check_writable, read_image_array, read_mask, write_image

    source = args.input
    if args.masks:
        raise UsageError("--masks DIR is for folders; for one image use --mask FILE")
    if not args.mask and not args.rect:
        raise UsageError("give the holes: --mask MASK (white = fill) or --rect x,y,w,h (repeatable)")
    output = args.output
    if os.path.isdir(output):
        output = os.path.join(output, os.path.basename(source))
    inputs = [source] + ([args.mask] if args.mask else [])
    for path in inputs:
        if os.path.exists(output) and _same(output, path):
            raise UsageError(f"refusing to overwrite the input {path} with the output")
    if os.path.exists(output) and not args.overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    _check_writable_extension(output)
    if args.mask and not os.path.isfile(args.mask):
        raise UsageError(f"no mask file {args.mask}")
    try:
        data = read_image_array(source)
        check_writable(output, data.shape[2])  # alpha needs a format that holds it
        image = array_to_tensor(data)
        mask = read_mask(args.mask) if args.mask else torch.zeros(1, *image.shape[-2:])
    except ValueError as exc:
        raise UsageError(str(exc))
    if mask.shape[-2:] != image.shape[-2:]:
        raise UsageError(f"mask {args.mask} is {mask.shape[-1]} x {mask.shape[-2]} but image {source} is "
                         f"{image.shape[-1]} x {image.shape[-2]}")
    if args.rect:
        mask = torch.maximum(mask, rect_mask(image.shape[-2], image.shape[-1], args.rect).float() / 255)
    net = _net(args, device)
    start = time.perf_counter()
    out = complete_with(net, image.to(device), mask.to(device), mask_threshold=args.mask_threshold,
                        postprocess=not args.no_postprocess)
    write_image(output, out.cpu(), data.dtype)
    seconds = time.perf_counter() - start
    print(f"completed 1 image in {seconds:.2f} s ({1 / seconds:.2f} images/s) -> {output}")
    return 0


# -- folders -------------------------------------------------------------------------------------

def _folder_jobs(args):
    from glcic_fast.inference.batching import Job

    source = args.input
    masks_dir = args.masks or args.mask
    if args.rect and masks_dir:
        raise UsageError("for a folder give either --masks DIR or --rect (the same rectangles for every image), not both")
    if not args.rect and not masks_dir:
        raise UsageError("give the holes: --masks DIR (one mask per image, matched by file name without the "
                         "extension) or --rect x,y,w,h (the same for every image)")
    if masks_dir and not os.path.isdir(masks_dir):
        raise UsageError(f"--masks {masks_dir} is not a folder")
    if masks_dir and _same(masks_dir, source):
        raise UsageError("the masks must be in a folder of their own (matched to the images by file stem)")
    out_dir = args.output
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"-o {out_dir} must be a folder when the input is a folder")
    if _same(out_dir, source):
        raise UsageError(f"refusing to write into the input folder {source}: pick another -o folder")
    if masks_dir and _same(out_dir, masks_dir):
        raise UsageError(f"refusing to write into the mask folder {masks_dir}: pick another -o folder")

    images = sorted(n for n in os.listdir(source) if _is_image(n) and os.path.isfile(os.path.join(source, n)))
    if not images:
        raise UsageError(f"no images ({', '.join(_image_extensions())}) in {source}")
    jobs = []
    if masks_dir:
        by_stem = {}
        for name in os.listdir(masks_dir):
            if _is_image(name):
                by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
        missing, ambiguous, mismatched = [], [], []
        for name in images:
            found = by_stem.get(os.path.splitext(name)[0], [])
            if not found:
                missing.append(name)
            elif len(found) > 1:
                ambiguous.append(f"{name}: {', '.join(sorted(found))}")
            else:
                jobs.append(Job(os.path.join(source, name), os.path.join(masks_dir, found[0]),
                                os.path.join(out_dir, name)))
        problems = []
        if missing:
            problems.append(f"{len(missing)} image(s) in {source} have no mask in {masks_dir} "
                            f"(a mask is matched by file name without the extension):\n{_listing(missing)}")
        if ambiguous:
            problems.append(f"{len(ambiguous)} image(s) match several masks:\n{_listing(ambiguous)}")
        for job in jobs:
            image_size, mask_size = _image_size(job.image), _image_size(job.mask)
            if image_size != mask_size:
                mismatched.append(f"{os.path.basename(job.image)} is {image_size[0]} x {image_size[1]}, "
                                  f"{os.path.basename(job.mask)} is {mask_size[0]} x {mask_size[1]}")
        if mismatched:
            problems.append(f"{len(mismatched)} mask(s) differ in size from their image:\n{_listing(mismatched)}")
        if problems:
            raise UsageError("\n".join(problems))
    else:
        jobs = [Job(os.path.join(source, n), tuple(args.rect), os.path.join(out_dir, n)) for n in images]
    for job in jobs:
        _check_writable_extension(job.output)
    existing = [j.output for j in jobs if os.path.exists(j.output)]
    if existing and not args.overwrite:
        raise UsageError(f"{len(existing)} output file(s) exist; pass --overwrite to replace them:\n{_listing(existing)}")
    return jobs


def _complete_folder(args, device, rank, world):
    from tqdm import tqdm

    from glcic_fast.inference.batching import complete_files

    jobs = _folder_jobs(args)  # every rank checks everything: they all fail alike
    mine = jobs[rank::world]
    net = _net(args, device)
    os.makedirs(args.output, exist_ok=True)
    show = not args.no_progress and rank == 0
    bar = tqdm(total=len(mine), unit="image", disable=not show, desc="completing")
    try:
        stats = complete_files(net, mine, device=device, dtype=args.dtype, batch_size=args.batch_size,
                               num_workers=args.workers, mask_threshold=args.mask_threshold,
                               postprocess=not args.no_postprocess, on_done=bar.update)
    except ValueError as exc:  # an image or mask that cannot be decoded, found while running
        raise UsageError(str(exc))
    finally:
        bar.close()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{prefix}completed {stats.images} images in {stats.seconds:.2f} s "
          f"({stats.images_per_second:.2f} images/s) -> {args.output}")
    return 0


def _complete(args):
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if not 0 <= args.mask_threshold < 1:
        raise UsageError(f"--mask-threshold must be in [0, 1), got {args.mask_threshold}")
    if not os.path.exists(args.input):
        raise UsageError(f"no such file or folder: {args.input}")
    rank, world, local_rank = _distributed()
    device = _device(args, world, local_rank)
    if os.path.isdir(args.input):
        return _complete_folder(args, device, rank, world)
    if world > 1:
        raise UsageError("torchrun is for folders; run one image without it")
    return _complete_one(args, device)


def _train(args):
    from glcic_fast.cli.train import run

    return run(args)


# -- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glcic-fast", description="Fast, exact GLCIC image completion")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time the fast net against the reference on this machine")
    bench.add_argument("--weights", help="weights to load (anything glcic_fast.load reads); default: the bundled "
                       "demo checkpoint if there is one, else a random initialisation")
    bench.add_argument("--image", help="image to complete (default: the bundled examples/astronaut.png)")
    bench.add_argument("--mask", help="mask image, white = fill (default: the bundled example's)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per network (median is shown)")
    bench.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                       help="both networks' precision (default float32; half precision is for GPUs)")
    bench.add_argument("-o", "--output", metavar="OUT",
                       help="also write the completed image here (replaced if it exists; trained weights only)")
    bench.set_defaults(func=_bench)

    comp = sub.add_parser(
        "complete", help="fill holes in an image or a folder of images",
        description="Fill the holes of IMAGE (or of every image in a folder). White mask pixels are filled. "
                    "Inputs are never overwritten. Exit status: 0 done, 2 usage or input errors.")
    comp.add_argument("input", metavar="IMAGE_OR_DIR", help="an image file, or a folder of images")
    comp.add_argument("-o", "--output", required=True, metavar="OUT",
                      help="output file (or folder, for a folder input; created if missing)")
    comp.add_argument("--mask", metavar="MASK", help="mask image for IMAGE, same size, white = fill")
    comp.add_argument("--masks", metavar="DIR", help="for a folder: folder of masks, matched by file stem")
    comp.add_argument("--rect", type=_parse_rect, action="append", metavar="x,y,w,h",
                      help="a rectangular hole (repeatable); with a folder, the same for every image")
    comp.add_argument("--weights", metavar="PATH",
                      help="trained weights: anything glcic_fast.load reads (default: $GLCIC_FAST_WEIGHTS)")
    comp.add_argument("--config", metavar="JSON", help="GLCIC-PyTorch's config.json (default: beside --weights)")
    comp.add_argument("--random-weights", action="store_true",
                      help="run a randomly initialised network (noise; for timings and smoke tests)")
    comp.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    comp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                      help="network precision (default float32; half precision is for GPUs)")
    comp.add_argument("--no-postprocess", action="store_true",
                      help="skip the paper's Telea + Poisson blend (the holes then hold the network's output)")
    comp.add_argument("--overwrite", action="store_true", help="replace existing output files")
    comp.add_argument("--mask-threshold", type=float, default=0.5, help="mask values above this are holes (0.5)")
    comp.add_argument("--batch-size", type=int, default=4, help="images per batch, folder mode (4)")
    comp.add_argument("--workers", type=int, default=2, help="image-decoding processes, folder mode (2)")
    comp.add_argument("--no-progress", action="store_true", help="no progress bar")
    comp.set_defaults(func=_complete)

    from glcic_fast.cli.train import add_arguments as add_train_arguments

    train = sub.add_parser("train", help="train the completion network as in the paper (resumable; DDP via torchrun)")
    add_train_arguments(train)
    train.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"glcic-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2

