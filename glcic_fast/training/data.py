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

A sample is a dict of tensors:

- ``image``: uint8, 3 x S x S (RGB), the random crop of the randomly rescaled image;
- ``hole``: int64 [y, x, h, w], the hole (the mask is built on the device, ``hole_mask``);
- ``local_fake``: int64 [y, x], top-left corner of the local discriminator's L x L patch
  for the completed image: centred on the hole, clipped inside the image;
- ``local_real``: int64 [y, x], a uniformly random patch corner for the real image;
- ``epoch``, ``index``: where the sample came from.

The hole is not filled here: the completion net's ``prepare_input`` fills it per the
net's input convention with the data set's mean pixel (``compute_mean_pixel``).
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

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


@dataclass(frozen=True)
class Augmentation:
    """Sizes of the paper's augmentation; all in pixels, ranges inclusive.

    Paper: ``image_size`` 256, ``scale_range`` (256, 384) for the shorter side,
    ``hole_range`` (96, 128) for the hole's width and height, ``local_size`` 128."""
    image_size: int = 256
    local_size: int = 128
    hole_range: Tuple[int, int] = (96, 128)
    scale_range: Optional[Tuple[int, int]] = None  # default (S, 1.5 S)

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


def sample_geometry(aug: Augmentation, height: int, width: int, rng: np.random.Generator):
    """The random choices for one image of ``height`` x ``width``, in a fixed order:
    (resized h, w), crop corner, hole [y, x, h, w], fake and real local-patch corners."""
    s, lo = aug.image_size, aug.local_size
    short = int(rng.integers(aug.scale_range[0], aug.scale_range[1], endpoint=True))
    if height <= width:
        rh, rw = short, max(s, int(round(width * short / height)))
    else:
        rh, rw = max(s, int(round(height * short / width))), short
    cy = int(rng.integers(0, rh - s, endpoint=True))
    cx = int(rng.integers(0, rw - s, endpoint=True))
    hh = int(rng.integers(aug.hole_range[0], aug.hole_range[1], endpoint=True))
    hw = int(rng.integers(aug.hole_range[0], aug.hole_range[1], endpoint=True))
    hy = int(rng.integers(0, s - hh, endpoint=True))
    hx = int(rng.integers(0, s - hw, endpoint=True))
    # The local patch for the completed image: centred on the hole, clipped inside.
    fy = min(max(hy + hh // 2 - lo // 2, 0), s - lo)
    fx = min(max(hx + hw // 2 - lo // 2, 0), s - lo)
    ry = int(rng.integers(0, s - lo, endpoint=True))
    rx = int(rng.integers(0, s - lo, endpoint=True))
    return (rh, rw), (cy, cx), (hy, hx, hh, hw), (fy, fx), (ry, rx)


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
        (rh, rw), (cy, cx), hole, fake, real = sample_geometry(self.aug, image.shape[0], image.shape[1], rng)
        shrink = rh * rw < image.shape[0] * image.shape[1]
        image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        s = self.aug.image_size
        crop = np.ascontiguousarray(image[cy:cy + s, cx:cx + s].transpose(2, 0, 1))
        return {"image": torch.from_numpy(crop),
                "hole": torch.tensor(hole, dtype=torch.int64),
                "local_fake": torch.tensor(fake, dtype=torch.int64),
                "local_real": torch.tensor(real, dtype=torch.int64),
                "epoch": torch.tensor(epoch, dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64)}


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
