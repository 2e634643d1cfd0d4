"""Many images at once, through the throughput engine (:mod:`glcic_fast.inference.engine`):
files to files (``glcic-fast complete DIR``) and in memory.

Each image is completed exactly as :func:`glcic_fast.inference.completion.complete_with`
completes it alone: the same region-of-interest crops (or the whole image where that is
cheaper), here batched with the crops of other images of the same size, up to
``batch_size`` crops a forward, in ``dtype`` (float32 by default; float16 and bfloat16 are
for GPUs), with CUDA graphs replayed for repeated batch shapes on a GPU. A batch that runs
out of CUDA memory is split, then tiled. The convolution library may round a batch
differently from a single image in the last bits.

I/O overlaps compute: a torch DataLoader with ``num_workers`` worker processes decodes
images and masks (8-bit images travel as uint8), in pinned memory on CUDA; the engine's
``num_writers`` finisher threads post-process (OpenCV, optional) and encode the files while
the device runs the next batch.
"""

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from glcic_fast.imageio import array_to_tensor, read_image_array
from glcic_fast.inference.engine import Engine
from glcic_fast.inference.masks import Rect, hole_mask

#: Images a folder run keeps in the engine per crop of batch: enough to fill batches of
#: every crop size that is common, few enough to bound the memory.
PENDING_PER_BATCH_SLOT = 4


@dataclass(frozen=True)
class Job:
    """One image to complete: the image file, its holes (a mask file, white = fill, and/or
    (x, y, w, h) rectangles: :func:`glcic_fast.inference.masks.hole_mask`) and where to
    write the result."""
    image: str
    mask: Optional[str]
    output: str
    rects: Sequence[Rect] = ()


def decode_image(path) -> Tuple[torch.Tensor, str]:
    """(C x H x W image, the file's sample type). The image has the file's channels (1 gray,
    3 RGB, 4 RGBA) and is uint8 for 8-bit files (a quarter of the bytes to move between
    processes), float32 in [0, 1] otherwise."""
    data = read_image_array(path)
    return array_to_tensor(data, keep_8bit=True), data.dtype.name


class JobDataset(torch.utils.data.Dataset):
    """Decodes job ``i``'s image and mask (in a DataLoader worker)."""

    def __init__(self, jobs: Sequence[Job]):
        self.jobs = list(jobs)

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        job = self.jobs[i]
        try:
            image, sample_type = decode_image(job.image)
            mask = hole_mask(image.shape[1], image.shape[2], job.mask, job.rects, image=job.image, keep_8bit=True)
        except ValueError as exc:
            # Handed back rather than raised: a worker process's exception reaches the caller
            # re-raised with the worker's traceback as its message.
            return {"index": i, "error": str(exc)}
        return {"index": i, "image": image, "mask": mask, "sample_type": sample_type}


@dataclass
class Stats:
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def complete_files(net, jobs: Sequence[Job], *, device=None, dtype=None, batch_size: int = 4,
                   num_workers: int = 2, num_writers: int = 2, mask_threshold: float = 0.5,
                   postprocess: bool = False, cuda_graphs: Optional[bool] = None,
                   on_done: Optional[Callable[[int], None]] = None) -> Stats:
    """Completes every job's image and writes it to the job's output (overwriting: the
    caller checks). ``on_done(n)`` is called (from a writer thread) as images finish.
    Returns the count and the wall time."""
    from glcic_fast.imageio import write_image

    device = torch.device(device) if device is not None else next(net.parameters()).device
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(JobDataset(jobs), batch_size=None, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if num_workers > 0 else None)

    def writer(output, sample_type):
        def write(image):
            write_image(output, image, sample_type)
            if on_done is not None:
                on_done(1)
        return write

    # No deadline: a batch waits for crops of its size until it is full, the loader is
    # ahead by max_pending images, or the end of the folder flushes.
    engine = Engine(net, device=device, dtype=dtype, max_batch=batch_size, max_wait_ms=None,
                    max_pending=PENDING_PER_BATCH_SLOT * batch_size, cuda_graphs=cuda_graphs,
                    finishers=num_writers, mask_threshold=mask_threshold)
    futures = []
    try:
        for item in loader:
            if "error" in item:
                raise ValueError(item["error"])
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            job = jobs[item["index"]]
            futures.append(engine.submit(item["image"], item["mask"], postprocess=postprocess,
                                         then=writer(job.output, item["sample_type"])))
    finally:
        engine.close()
    for f in futures:
        f.result()  # a write that failed
    return Stats(len(jobs), time.perf_counter() - start)


def complete_many(net, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *, dtype=None,
                  batch_size: int = 4, mask_threshold: float = 0.5, postprocess: bool = False,
                  cuda_graphs: Optional[bool] = None) -> List[torch.Tensor]:
    """In-memory version: 3 x H x W images in [0, 1] (any sizes, on any device) and
    1 x H x W masks; returns the completed images (float32, on the CPU), in order."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if image.dim() != 3 or image.shape[0] != 3 or mask.shape != (1,) + tuple(image.shape[-2:]):
            raise ValueError(f"image {i}: expected 3 x H x W and a 1 x H x W mask, "
                             f"got {tuple(image.shape)} and {tuple(mask.shape)}")
    # Every batch shape is captured the first time it is seen: these images are all
    # this engine will ever see.
    with Engine(net, dtype=dtype, max_batch=batch_size, max_wait_ms=None, cuda_graphs=cuda_graphs, capture_after=1,
                finishers=1, mask_threshold=mask_threshold) as engine:
        futures = [engine.submit(image, mask, postprocess=postprocess) for image, mask in zip(images, masks)]
    return [f.result() for f in futures]
