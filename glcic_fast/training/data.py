"""Training data: the paper's augmentation (SPEC.md section 4), deterministic and resumable.

Every random choice for a sample is a pure function of ``(seed, epoch, index)`` (a numpy
``SeedSequence`` built from them), and the order of samples is a pure function of
``(seed, epoch)``. Training is one stream of samples: the concatenation of epoch 0's
permutation of the images, epoch 1's, ...; global batch ``g`` is samples
``[g * B, (g + 1) * B)`` of that stream, and rank ``r`` of ``W`` takes the r-th
``B / W`` of it. So the data a run sees depends only on (seed, global batch B, image
list, step), not on the number of processes or data-loader workers, and resuming at a
step needs no sampler state beyond the step itself (the checkpoint records epoch and
position too, for people reading it).

The holes (``Augmentation.holes``): the paper's rectangles (``"rect"``), free-form
strokes and blobs for object removal (``"free"``, ``FreeFormMasks``), or each sample one
or the other (``"mixed"``). Free-form masks are drawn here, in the data workers, from the
sample's own random stream like every other choice: a function of (seed, epoch, index).

A sample is a dict of tensors:

- ``image``: uint8, 3 x S x S (RGB), the random crop of the randomly rescaled image;
- ``hole``: int64 [y, x, h, w], the rectangle, or a free-form hole's bounding box;
- ``mask``: uint8, 1 x S x S, 1 in the hole; only where the holes are not all rectangles
  (a rectangles-only run builds its masks on the device from ``hole``: ``hole_mask``);
- ``local_fake``: int64 [y, x], top-left corner of the local discriminator's L x L patch
  for the completed image: centred on the hole (a free-form hole's bounding box),
  clipped inside the image;
- ``local_real``: int64 [y, x], a uniformly random patch corner for the real image;
- ``epoch``, ``index``: where the sample came from.

The hole is not filled here: the completion net's ``prepare_input`` fills it per the
net's input convention with the data set's mean pixel (``compute_mean_pixel``).
"""

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from glcic_fast.imageio import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


# Distinct first words keep the two kinds of random streams apart.
_PERMUTATION_STREAM = 1
_SAMPLE_STREAM = 2
_MEAN_SUBSET_STREAM = 3


def list_images(root) -> List[str]:
    """Image files under ``root`` (recursive; the extensions of
    glcic_fast.imageio.IMAGE_EXTENSIONS, in any case), as sorted paths relative to ``root``
    with '/' separators. Hidden files and folders are skipped."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root}")
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        rel = os.path.relpath(directory, root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    found.sort()
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return found


def files_digest(files: Sequence[str]) -> str:
    """A short hash of the image list: a resumed run must see the same list."""
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def read_image(path: str) -> np.ndarray:
    """H x W x 3 uint8 RGB. Grey images are expanded, alpha is dropped, 16-bit is reduced
    to 8-bit and EXIF orientation is applied (OpenCV's IMREAD_COLOR)."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)  # imdecode: paths with any characters
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise OSError(f"could not decode {path} as an image")
    return np.ascontiguousarray(image[:, :, ::-1])


HOLE_KINDS = ("rect", "free", "mixed")
#: The largest turn of a free-form stroke's direction at a vertex, either way.
STROKE_MAX_TURN = math.pi / 2


def _as_range(name: str, value, kind, low, high) -> tuple:
    """``value`` as an inclusive (min, max) of ``kind`` within [low, high], or ValueError."""
    pair = tuple(kind(v) for v in value)
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {tuple(value)}")
    return pair


@dataclass(frozen=True)
class FreeFormMasks:
    """Free-form holes, for object removal: random blobs and strokes drawn with OpenCV at
    the crop's resolution S. Counts are inclusive ranges; sizes are fractions of S, so
    the same settings fit every image size; the area is a fraction of the S x S image.

    - ``blob_count`` blobs: filled ellipses, each semi-axis drawn from ``blob_size``, at
      any rotation;
    - then ``stroke_count`` strokes, DeepFill v2's brush strokes (Yu et al., ICCV 2019)
      in sizes relative to the image: thick polylines of ``stroke_vertices`` vertices
      (vertices - 1 segments), one width from ``stroke_width`` per stroke, each segment's
      length from ``stroke_length``, the direction turning by up to 90 degrees either way
      at each vertex; vertices stay inside the image;
    - each blob and stroke starts on a pixel not yet in the hole;
    - the hole covers a fraction of the image within ``area``, always: a piece (a blob,
      or one segment of a stroke) that would take it over the maximum is left out (the
      stroke ends there), and while it is under the minimum more strokes are drawn. The
      range must be wider than the largest piece can be (checked), so that the minimum
      is always reached without passing the maximum. A blob's pixels form one connected
      region, and so do a stroke's.
    """
    stroke_count: Tuple[int, int] = (1, 4)
    stroke_vertices: Tuple[int, int] = (4, 12)
    stroke_width: Tuple[float, float] = (0.05, 0.15)
    stroke_length: Tuple[float, float] = (0.05, 0.25)
    blob_count: Tuple[int, int] = (0, 2)
    blob_size: Tuple[float, float] = (0.05, 0.2)
    area: Tuple[float, float] = (0.05, 0.4)

    def __post_init__(self):
        for name, kind, low, high in (("stroke_count", int, 0, math.inf), ("stroke_vertices", int, 2, math.inf),
                                      ("stroke_width", float, 0.0, 1.0), ("stroke_length", float, 0.0, math.inf),
                                      ("blob_count", int, 0, math.inf), ("blob_size", float, 0.0, 1.0),
                                      ("area", float, 0.0, 1.0)):
            object.__setattr__(self, name, _as_range(name, getattr(self, name), kind, low, high))
        if not (0 < self.area[0] and self.area[1] < 1):
            raise ValueError(f"area must lie strictly between 0 and 1 (a hole that is empty or the whole image "
                             f"teaches nothing), got {self.area}")

    def pixel_area(self, size: int) -> Tuple[int, int]:
        """(min, max) pixels in the hole of an S x S image."""
        return math.ceil(self.area[0] * size * size), math.floor(self.area[1] * size * size)

    def largest_piece(self, size: int) -> int:
        """An upper bound on the pixels of one piece at image side ``size``: a stroke's
        segment (length, plus rounding, plus its round caps, by its width, with a margin
        for the raster) or a blob."""
        width, length = _pixels(self.stroke_width[1], size), self.stroke_length[1] * size + 1
        segment = (length + width + 3) * (width + 3)
        axis = _pixels(self.blob_size[1], size)
        blob = math.pi * (axis + 2) ** 2 if self.blob_count[1] else 0
        return math.ceil(max(segment, blob))

    def check(self, size: int):
        """ValueError unless masks of side ``size`` can always be drawn as documented."""
        lo, hi = self.pixel_area(size)
        if lo < 1 or hi - lo < self.largest_piece(size):
            raise ValueError(
                f"free-form area {self.area} of a {size} x {size} image is {lo}-{hi} pixels: it must be at least "
                f"1 pixel and wider than the largest piece, up to {self.largest_piece(size)} pixels (a blob of "
                f"semi-axis {self.blob_size[1]} or a stroke segment of width {self.stroke_width[1]} and length "
                f"{self.stroke_length[1]}): widen the area range or make the strokes and blobs smaller")


def _pixels(fraction: float, size: int) -> int:
    """A stroke's width or a blob's semi-axis in pixels: at least one."""
    return max(1, round(fraction * size))


class _Hole:
    """A free-form hole being drawn: pieces are added while the hole stays within its
    largest area."""

    def __init__(self, size: int, max_pixels: int):
        self.mask = np.zeros((size, size), np.uint8)
        self.pixels, self.max_pixels = 0, max_pixels

    def add(self, draw) -> bool:
        """Draw a piece (``draw(canvas)``) if the hole then has at most its largest area."""
        import cv2

        canvas = self.mask.copy()
        draw(canvas)
        pixels = cv2.countNonZero(canvas)
        if pixels > self.max_pixels:
            return False
        self.mask, self.pixels = canvas, pixels
        return True

    def start_point(self, rng: np.random.Generator) -> Tuple[int, int]:
        """(x, y) of a uniformly random pixel not yet in the hole: random pixels until one
        is outside (fewer than 1 / (1 - largest area) draws on average)."""
        size = self.mask.shape[0]
        while True:
            y, x = (int(v) for v in rng.integers(0, size, 2))
            if not self.mask[y, x]:
                return x, y


def _draw_blob(hole: _Hole, settings: FreeFormMasks, rng: np.random.Generator):
    import cv2

    size = hole.mask.shape[0]
    centre = hole.start_point(rng)
    axes = tuple(_pixels(rng.uniform(*settings.blob_size), size) for _ in range(2))
    angle = rng.uniform(0, 180)
    hole.add(lambda m: cv2.ellipse(m, centre, axes, angle, 0, 360, 1, thickness=-1))


def _draw_stroke(hole: _Hole, settings: FreeFormMasks, rng: np.random.Generator):
    import cv2

    size = hole.mask.shape[0]
    width = _pixels(rng.uniform(*settings.stroke_width), size)
    vertices = int(rng.integers(settings.stroke_vertices[0], settings.stroke_vertices[1], endpoint=True))
    x, y = hole.start_point(rng)
    direction = rng.uniform(0, 2 * math.pi)
    for _ in range(vertices - 1):
        length = rng.uniform(*settings.stroke_length) * size
        nx = min(max(int(round(x + length * math.cos(direction))), 0), size - 1)
        ny = min(max(int(round(y + length * math.sin(direction))), 0), size - 1)
        start, end = (x, y), (nx, ny)
        if not hole.add(lambda m: cv2.line(m, start, end, 1, thickness=width)):
            return
        x, y = nx, ny
        direction += rng.uniform(-STROKE_MAX_TURN, STROKE_MAX_TURN)


def draw_free_form(size: int, settings: FreeFormMasks, rng: np.random.Generator) -> np.ndarray:
    """A size x size uint8 free-form mask (1 = hole) drawn with ``rng`` as ``settings``
    documents (``settings.check(size)`` must hold)."""
    lo, hi = settings.pixel_area(size)
    hole = _Hole(size, hi)
    blobs = int(rng.integers(settings.blob_count[0], settings.blob_count[1], endpoint=True))
    strokes = int(rng.integers(settings.stroke_count[0], settings.stroke_count[1], endpoint=True))
    for _ in range(blobs):
        _draw_blob(hole, settings, rng)
    for _ in range(strokes):
        _draw_stroke(hole, settings, rng)
    # Each new stroke's first segment covers its uncovered start pixel and fits (check()),
    # so every round adds at least one pixel.
    while hole.pixels < lo:
        _draw_stroke(hole, settings, rng)
    return hole.mask


def mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """[y, x, h, w] of the bounding box of a mask's non-zero pixels."""
    import cv2

    x, y, w, h = cv2.boundingRect(mask)
    return y, x, h, w


def rect_mask(box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    """The size x size uint8 mask of the rectangle [y, x, h, w]."""
    y, x, h, w = box
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


@dataclass(frozen=True)
class Augmentation:
    """Sizes of the paper's augmentation and the kind of hole; sizes in pixels, ranges
    inclusive.

    Paper: ``image_size`` 256, ``scale_range`` (256, 384) for the shorter side,
    ``hole_range`` (96, 128) for the hole's width and height, ``local_size`` 128.

    ``holes``: ``"rect"`` the paper's rectangles; ``"free"`` free-form masks
    (``free_form``); ``"mixed"`` each sample free-form with probability
    ``free_probability``, else a rectangle."""
    image_size: int = 256
    local_size: int = 128
    hole_range: Tuple[int, int] = (96, 128)
    scale_range: Optional[Tuple[int, int]] = None  # default (S, 1.5 S)
    holes: str = "rect"
    free_probability: float = 0.5
    free_form: FreeFormMasks = field(default_factory=FreeFormMasks)

    def __post_init__(self):
        s, lo = self.image_size, self.local_size
        if self.scale_range is None:
            object.__setattr__(self, "scale_range", (s, (3 * s) // 2))
        object.__setattr__(self, "hole_range", tuple(int(v) for v in self.hole_range))
        object.__setattr__(self, "scale_range", tuple(int(v) for v in self.scale_range))
        hmin, hmax = self.hole_range
        smin, smax = self.scale_range
        if s < 4 or s % 4:
            raise ValueError(f"image_size must be a positive multiple of 4 (the completion net's stride), got {s}")
        if not 1 <= lo <= s:
            raise ValueError(f"local_size must be in [1, image_size={s}], got {lo}")
        if not 1 <= hmin <= hmax <= s:
            raise ValueError(f"hole_range must satisfy 1 <= min <= max <= image_size={s}, got {self.hole_range}")
        if not s <= smin <= smax:
            raise ValueError(f"scale_range must satisfy image_size={s} <= min <= max, got {self.scale_range}")
        if self.holes not in HOLE_KINDS:
            raise ValueError(f"holes must be one of {HOLE_KINDS}, got {self.holes!r}")
        if not 0 <= self.free_probability <= 1:
            raise ValueError(f"free_probability must be in [0, 1], got {self.free_probability}")
        if self.holes != "rect":
            self.free_form.check(s)


class Geometry(NamedTuple):
    """One sample's random choices (see ``sample_geometry``)."""
    #: (h, w) of the rescaled image, and the crop's top-left corner (y, x) in it.
    resized: Tuple[int, int]
    crop: Tuple[int, int]
    #: The hole: a rectangle [y, x, h, w], or a free-form hole's bounding box.
    hole: Tuple[int, int, int, int]
    #: S x S uint8 mask (1 = hole) where ``holes`` is not "rect"; None there.
    mask: Optional[np.ndarray]
    #: Top-left corners (y, x) of the local patches: centred on the hole, and random.
    local_fake: Tuple[int, int]
    local_real: Tuple[int, int]


def centred_patch(box: Tuple[int, int, int, int], size: int, local: int) -> Tuple[int, int]:
    """The corner (y, x) of the local x local patch centred on the box [y, x, h, w],
    clipped inside the size x size image."""
    y, x, h, w = box
    return min(max(y + h // 2 - local // 2, 0), size - local), min(max(x + w // 2 - local // 2, 0), size - local)


def sample_geometry(aug: Augmentation, height: int, width: int, rng: np.random.Generator) -> Geometry:
    """The random choices for one image of ``height`` x ``width``, in a fixed order:
    rescaled size, crop corner, the hole (for "mixed" first whether it is free-form),
    the real local patch's corner."""
    s, lo = aug.image_size, aug.local_size
    short = int(rng.integers(aug.scale_range[0], aug.scale_range[1], endpoint=True))
    if height <= width:
        rh, rw = short, max(s, int(round(width * short / height)))
    else:
        rh, rw = max(s, int(round(height * short / width))), short
    cy = int(rng.integers(0, rh - s, endpoint=True))
    cx = int(rng.integers(0, rw - s, endpoint=True))
    free = aug.holes == "free" or (aug.holes == "mixed" and rng.random() < aug.free_probability)
    if free:
        mask = draw_free_form(s, aug.free_form, rng)
        hole = mask_box(mask)
    else:
        hh = int(rng.integers(aug.hole_range[0], aug.hole_range[1], endpoint=True))
        hw = int(rng.integers(aug.hole_range[0], aug.hole_range[1], endpoint=True))
        hy = int(rng.integers(0, s - hh, endpoint=True))
        hx = int(rng.integers(0, s - hw, endpoint=True))
        hole = (hy, hx, hh, hw)
        # Rectangles-only runs send the rectangle alone; in "mixed" every sample has a mask.
        mask = rect_mask(hole, s) if aug.holes == "mixed" else None
    ry = int(rng.integers(0, s - lo, endpoint=True))
    rx = int(rng.integers(0, s - lo, endpoint=True))
    return Geometry((rh, rw), (cy, cx), hole, mask, centred_patch(hole, s, lo), (ry, rx))


class ImageFolder(Dataset):
    """The images under ``root`` (or the given relative ``files``), augmented as the paper.

    Index with ``(epoch, index)`` (what ``StepBatchSampler`` yields) or a plain ``index``
    (epoch 0). An image that cannot be read is replaced, deterministically, by the next
    readable one in the list, with a warning.
    """

    def __init__(self, root, aug: Augmentation = Augmentation(), seed: int = 0,
                 files: Optional[Sequence[str]] = None):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.root = os.fspath(root)
        self.files = list(files) if files is not None else list_images(self.root)
        if not self.files:
            raise ValueError(f"no images under {self.root}")
        self.aug, self.seed = aug, int(seed)
        self._warned = set()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def _read(self, index: int) -> np.ndarray:
        for k in range(min(len(self.files), 100)):
            j = (index + k) % len(self.files)
            try:
                return read_image(self.path(j))
            except OSError as exc:
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("skipping unreadable image (a neighbour is used instead): %s", exc)
        raise OSError(f"100 unreadable images in a row from {self.path(index)}: is {self.root} readable?")

    def __getitem__(self, key):
        import cv2

        epoch, index = key if isinstance(key, tuple) else (0, key)
        epoch, index = int(epoch), int(index)
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        image = self._read(index)
        rng = np.random.default_rng([_SAMPLE_STREAM, self.seed, epoch, index])
        geometry = sample_geometry(self.aug, image.shape[0], image.shape[1], rng)
        (rh, rw), (cy, cx) = geometry.resized, geometry.crop
        shrink = rh * rw < image.shape[0] * image.shape[1]
        image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        s = self.aug.image_size
        crop = np.ascontiguousarray(image[cy:cy + s, cx:cx + s].transpose(2, 0, 1))
        sample = {"image": torch.from_numpy(crop),
                  "hole": torch.tensor(geometry.hole, dtype=torch.int64),
                  "local_fake": torch.tensor(geometry.local_fake, dtype=torch.int64),
                  "local_real": torch.tensor(geometry.local_real, dtype=torch.int64),
                  "epoch": torch.tensor(epoch, dtype=torch.int64),
                  "index": torch.tensor(index, dtype=torch.int64)}
        if geometry.mask is not None:
            sample["mask"] = torch.from_numpy(geometry.mask[None])
        return sample


def worker_init(_worker_id: int):
    """Data-loader workers: one OpenCV thread each (the workers are the parallelism), and
    deaf to SIGINT / SIGTERM. Ctrl-C, ``timeout`` and schedulers signal the whole process
    group; a worker killed by it would crash the trainer (the DataLoader reports the dead
    worker) before it could write its checkpoint. The trainer alone handles the signal and
    then shuts its workers down."""
    import signal

    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


# -- order ----------------------------------------------------------------------------------

def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([_PERMUTATION_STREAM, seed, epoch]).permutation(num_images)


def stream_position(step: int, global_batch: int, num_images: int) -> Tuple[int, int]:
    """(epoch, position in that epoch's permutation) of the first sample of global batch ``step``."""
    return divmod(step * global_batch, num_images)


class StepBatchSampler:
    """Batch sampler for a DataLoader: for each step in [start_step, end_step), this rank's
    share of the global batch, as a list of (epoch, index) keys (see the module docstring).

    The global batch must be a multiple of ``world_size``; the share of rank r is the r-th
    contiguous slice, so W processes with batch B / W see exactly the global batch of one
    process with batch B."""

    def __init__(self, num_images: int, global_batch: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, end_step: Optional[int] = None):
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"the global batch {global_batch} must be a positive multiple of the "
                             f"number of processes {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for {world_size} processes")
        self.num_images, self.global_batch, self.seed = num_images, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.start_step, self.end_step = start_step, end_step
        self._perms = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most a few epochs; keep the latest
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.num_images, self.seed, epoch)
        return self._perms[epoch]

    def batch(self, step: int) -> List[Tuple[int, int]]:
        local = self.global_batch // self.world_size
        first = step * self.global_batch + self.rank * local
        keys = []
        for k in range(first, first + local):
            epoch, pos = divmod(k, self.num_images)
            keys.append((epoch, int(self._perm(epoch)[pos])))
        return keys

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless sampler has no length")
        return max(0, self.end_step - self.start_step)


# -- mean pixel -------------------------------------------------------------------------------

class _PixelSums(Dataset):
    def __init__(self, dataset: ImageFolder, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image = self.dataset._read(self.indices[i])
        sums = image.reshape(-1, 3).sum(axis=0, dtype=np.float64)
        return torch.from_numpy(sums), image.shape[0] * image.shape[1]


def mean_pixel_indices(num_images: int, max_images: Optional[int], seed: int) -> np.ndarray:
    """All images, or a seeded random subset of ``max_images`` of them (sorted)."""
    if max_images is None or max_images >= num_images:
        return np.arange(num_images)
    if max_images < 1:
        raise ValueError(f"max_images must be positive, got {max_images}")
    rng = np.random.default_rng([_MEAN_SUBSET_STREAM, seed])
    return np.sort(rng.choice(num_images, size=max_images, replace=False))


def compute_mean_pixel(dataset: ImageFolder, *, max_images: Optional[int] = None, workers: int = 0,
                       rank: int = 0, world_size: int = 1, reduce=None, progress: bool = False) -> List[float]:
    """The data set's mean pixel, RGB in [0, 1]: the mean over every pixel of every image
    at its stored resolution (or of a seeded subset of ``max_images`` images). With
    several processes each reads its share and ``reduce`` (a callable summing a float64
    tensor over processes in place) combines them."""
    from torch.utils.data import DataLoader

    indices = mean_pixel_indices(len(dataset), max_images, dataset.seed)[rank::world_size]
    loader = DataLoader(_PixelSums(dataset, indices), batch_size=None, num_workers=workers,
                        worker_init_fn=worker_init if workers else None)
    total = torch.zeros(4, dtype=torch.float64)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, total=len(indices), desc="mean pixel", unit="img")
    for sums, count in loader:
        total[:3] += sums
        total[3] += count
    if reduce is not None:
        reduce(total)
    if total[3] == 0:
        raise ValueError("no pixels to average")
    return (total[:3] / total[3] / 255.0).tolist()


# -- on the device ------------------------------------------------------------------------------

def hole_mask(holes: torch.Tensor, size: int, dtype=torch.float32) -> torch.Tensor:
    """N x 1 x size x size masks, 1 inside each [y, x, h, w] hole."""
    ar = torch.arange(size, device=holes.device)
    y, x, h, w = (holes[:, i, None] for i in range(4))
    rows = (ar >= y) & (ar < y + h)
    cols = (ar >= x) & (ar < x + w)
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1).to(dtype)


def crop_squares(images: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """N x C x size x size patches of ``images`` (N x C x H x W) at the [y, x] ``corners``
    (N x 2), in one gather (differentiable; a channels_last input gives a channels_last
    result)."""
    n = images.shape[0]
    ar = torch.arange(size, device=images.device)
    rows = corners[:, 0, None].to(images.device) + ar
    cols = corners[:, 1, None].to(images.device) + ar
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indices split by a slice: the result is N x size x size x C.
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
