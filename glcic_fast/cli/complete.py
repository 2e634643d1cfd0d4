"""``glcic-fast complete``: fill holes in one image or in a folder of images.

    glcic-fast complete photo.jpg --mask mask.png -o out.png --weights completionnet_places2.t7
    glcic-fast complete photo.jpg --rect 120,80,64,48 --rect 300,10,20,20 -o out.png --weights w.t7
    glcic-fast complete photos/ --masks masks/ -o completed/ --weights w.t7
    torchrun --nproc-per-node 4 -m glcic_fast.cli complete photos/ --masks masks/ -o completed/ --weights w.t7

Weights: ``--weights`` (anything ``glcic_fast.load`` reads) or the ``GLCIC_FAST_WEIGHTS``
environment variable. Without either the command stops with an error: a randomly
initialised network produces noise, and writing noise into files by accident helps no
one. ``--random-weights`` runs one anyway (for timings), with a warning.

Holes: a mask file and/or ``--rect`` rectangles. A rectangle reaching outside the image is
clipped to it, with a warning; one wholly outside is an error (it would fill nothing). In a
folder the same rectangles apply to every image, and one wholly outside any of them is an
error for the whole run.

Post-processing (the paper's Telea + Poisson blend) is on unless ``--no-postprocess``.
Inputs are never overwritten: the command refuses an output that is one of its inputs or
an output folder that is the input or mask folder, and refuses to replace existing
output files unless ``--overwrite``. A folder is checked before anything is written (every
image's and mask's header: readable, sizes matching, rectangles overlapping). Exit status:
0 done, 2 usage or input errors (nothing written; except that a file whose header reads
but whose data does not decode stops a folder run when it is reached, keeping the images
completed before it), 1 anything unexpected.
"""

import argparse
import os
import sys
import warnings
from collections import defaultdict

from glcic_fast.cli import common
from glcic_fast.cli.common import UsageError, check_writable_extension, image_extensions

#: Most entries an error message lists; names a warning lists.
_LIST_LIMIT, _NAMES_LIMIT = 20, 3

DESCRIPTION = ("Fill the holes of IMAGE (or of every image in a folder). White mask pixels are filled. A folder "
               "is checked before anything is written: every image and mask must be readable, each mask its "
               "image's size, and each --rect must overlap every image. Inputs are never overwritten. Exit "
               "status: 0 done, 2 usage or input errors.")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("input", metavar="IMAGE_OR_DIR", help="an image file, or a folder of images")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file (or folder, for a folder input; created if missing)")
    p.add_argument("--mask", metavar="MASK", help="mask image for IMAGE, same size, white = fill")
    p.add_argument("--masks", metavar="DIR", help="for a folder: folder of masks, matched by file stem")
    p.add_argument("--rect", type=_parse_rect, action="append", metavar="x,y,w,h",
                   help="a rectangular hole (repeatable), clipped to the image with a warning; wholly outside "
                        "the image it is an error. With a folder, the same for every image: a rectangle wholly "
                        "outside any of the images stops the run before anything is written")
    p.add_argument("--weights", metavar="PATH",
                   help="trained weights: anything glcic_fast.load reads (default: $GLCIC_FAST_WEIGHTS)")
    p.add_argument("--config", metavar="JSON", help="GLCIC-PyTorch's config.json (default: beside --weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="run a randomly initialised network (noise; for timings and smoke tests)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="network precision (default float32; half precision is for GPUs)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="skip the paper's Telea + Poisson blend (the holes then hold the network's output)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="mask values above this are holes (0.5)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch, folder mode (4)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes, folder mode (2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args):
    from glcic_fast.devices import torchrun_ranks

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if not 0 <= args.mask_threshold < 1:
        raise UsageError(f"--mask-threshold must be in [0, 1), got {args.mask_threshold}")
    if not os.path.exists(args.input):
        raise UsageError(f"no such file or folder: {args.input}")
    rank, world, local_rank = torchrun_ranks()
    device = common.pick_device(args, world, local_rank)
    if os.path.isdir(args.input):
        return _complete_folder(args, device, rank, world)
    if world > 1:
        raise UsageError("torchrun is for folders; run one image without it")
    return _complete_one(args, device)


# -- helpers -------------------------------------------------------------------------------

def _parse_rect(text):
    from glcic_fast.inference.masks import parse_rect

    try:
        return parse_rect(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _listing(lines, limit=_LIST_LIMIT):
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _warn(message):
    print(f"glcic-fast complete: warning: {message}", file=sys.stderr)


def _is_image(name):
    return name.lower().endswith(image_extensions()) and not name.startswith(".")


def _same(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def _net(args, device):
    from glcic_fast.inference.api import WEIGHTS_ENV, get_net
    from glcic_fast.nn.weights import WeightsError

    weights = args.weights or os.environ.get(WEIGHTS_ENV)
    if args.random_weights:
        if args.weights:
            raise UsageError("--random-weights and --weights exclude each other")
        _warn("the network is randomly initialised (--random-weights): the outputs are noise, not completions")
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

    from glcic_fast.imageio import array_to_tensor, check_writable, read_image_array, write_image
    from glcic_fast.inference.completion import complete_with
    from glcic_fast.inference.masks import clip_rect, hole_mask, rect_text

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
    check_writable_extension(output)
    if args.mask and not os.path.isfile(args.mask):
        raise UsageError(f"no mask file {args.mask}")
    rects = args.rect or []
    try:
        data = read_image_array(source)
        check_writable(output, data.shape[2])  # alpha needs a format that holds it
        height, width = data.shape[:2]
        clipped = [clip_rect(rect, height, width, source) for rect in rects]
        mask = hole_mask(height, width, args.mask, rects, image=source)
    except ValueError as exc:
        raise UsageError(str(exc))
    for rect, inside in zip(rects, clipped):
        if inside != rect:
            _warn(f"--rect {rect_text(rect)} reaches outside {source} ({width} x {height} pixels): "
                  f"clipped to {rect_text(inside)}")
    image = array_to_tensor(data)
    net = _net(args, device)
    start = time.perf_counter()
    out = complete_with(net, image.to(device), mask.to(device), mask_threshold=args.mask_threshold,
                        postprocess=not args.no_postprocess)
    write_image(output, out.cpu(), data.dtype)
    seconds = time.perf_counter() - start
    print(f"completed 1 image in {seconds:.2f} s ({1 / seconds:.2f} images/s) -> {output}")
    return 0


# -- folders -------------------------------------------------------------------------------------

def _folder_pairs(source, masks_dir, images):
    """[(image path, mask path or None)] and the problems matching masks to images."""
    if not masks_dir:
        return [(os.path.join(source, n), None) for n in images], []
    by_stem = {}
    for name in os.listdir(masks_dir):
        if _is_image(name):
            by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
    pairs, missing, ambiguous = [], [], []
    for name in images:
        found = by_stem.get(os.path.splitext(name)[0], [])
        if not found:
            missing.append(name)
        elif len(found) > 1:
            ambiguous.append(f"{name}: {', '.join(sorted(found))}")
        else:
            pairs.append((os.path.join(source, name), os.path.join(masks_dir, found[0])))
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) in {source} have no mask in {masks_dir} "
                        f"(a mask is matched by file name without the extension):\n{_listing(missing)}")
    if ambiguous:
        problems.append(f"{len(ambiguous)} image(s) match several masks:\n{_listing(ambiguous)}")
    return pairs, problems


def _check_headers(pairs, rects):
    """The problems found in the files' headers (unreadable files, masks of another size,
    rectangles wholly outside an image), and a warning line per rectangle clipped."""
    from glcic_fast.imageio import image_size
    from glcic_fast.inference.masks import clip_rect, rect_text

    unreadable, mismatched = [], []
    outside, clipped = defaultdict(list), defaultdict(list)
    for image, mask in pairs:
        try:
            width, height = image_size(image)
            mask_size = image_size(mask) if mask else None
        except ValueError as exc:
            unreadable.append(str(exc))
            continue
        name = os.path.basename(image)
        if mask_size and mask_size != (width, height):
            mismatched.append(f"{name} is {width} x {height}, "
                              f"{os.path.basename(mask)} is {mask_size[0]} x {mask_size[1]}")
        for rect in rects:
            try:
                inside = clip_rect(rect, height, width)
            except ValueError:
                outside[rect].append(f"{name} ({width} x {height})")
                continue
            if inside != rect:
                clipped[rect, inside].append(name)
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} file(s) cannot be read:\n{_listing(unreadable)}")
    if mismatched:
        problems.append(f"{len(mismatched)} mask(s) differ in size from their image:\n{_listing(mismatched)}")
    for rect, names in outside.items():
        problems.append(f"--rect {rect_text(rect)} lies wholly outside {len(names)} image(s) (it would fill "
                        f"nothing there; the rectangles apply to every image of the folder):\n{_listing(names)}")
    notes = []
    for (rect, inside), names in clipped.items():
        more = f" and {len(names) - _NAMES_LIMIT} more" if len(names) > _NAMES_LIMIT else ""
        notes.append(f"--rect {rect_text(rect)} reaches outside {len(names)} image(s), clipped to "
                     f"{rect_text(inside)} there: {', '.join(names[:_NAMES_LIMIT])}{more}")
    return problems, notes


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
        raise UsageError(f"no images ({', '.join(image_extensions())}) in {source}")
    rects = tuple(args.rect or ())
    pairs, problems = _folder_pairs(source, masks_dir, images)
    header_problems, notes = _check_headers(pairs, rects)
    problems += header_problems
    if problems:
        raise UsageError("\n".join(problems))
    jobs = [Job(image, mask, os.path.join(out_dir, os.path.basename(image)), rects) for image, mask in pairs]
    for job in jobs:
        check_writable_extension(job.output)
    existing = [j.output for j in jobs if os.path.exists(j.output)]
    if existing and not args.overwrite:
        raise UsageError(f"{len(existing)} output file(s) exist; pass --overwrite to replace them:\n{_listing(existing)}")
    return jobs, notes


def _complete_folder(args, device, rank, world):
    from tqdm import tqdm

    from glcic_fast.inference.batching import complete_files

    jobs, notes = _folder_jobs(args)  # every rank checks everything: they all fail alike
    if rank == 0:
        for note in notes:
            _warn(note)
    mine = jobs[rank::world]
    net = _net(args, device)
    os.makedirs(args.output, exist_ok=True)
    show = not args.no_progress and rank == 0
    bar = tqdm(total=len(mine), unit="image", disable=not show, desc="completing")
    try:
        stats = complete_files(net, mine, device=device, dtype=args.dtype, batch_size=args.batch_size,
                               num_workers=args.workers, mask_threshold=args.mask_threshold,
                               postprocess=not args.no_postprocess, on_done=bar.update)
    except ValueError as exc:  # a file whose header reads but whose data does not decode
        raise UsageError(str(exc))
    finally:
        bar.close()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{prefix}completed {stats.images} images in {stats.seconds:.2f} s "
          f"({stats.images_per_second:.2f} images/s) -> {args.output}")
    return 0
