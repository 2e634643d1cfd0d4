"""Throughput: completing many images of mixed sizes.

- **Bucketing**: images are grouped by their padded size (H and W rounded up to 4, the
  frame the network runs in) and run in batches of up to ``batch_size`` of one size; each
  image is padded exactly as :func:`glcic_fast.inference.completion.complete_with` pads it, so a
  batch computes the same thing as one image at a time (the convolution library may
  round a batch differently in the last bits).
- **dtype**: the net is converted (a copy) to ``dtype``: float32 (default), float16 or
  bfloat16. Half precision is for GPUs; the results then differ from float32 by the
  precision's rounding.
- **channels_last** input, the layout every backend runs natively.
- **CUDA graphs** (CUDA only, ``cuda_graphs=None`` means on): the forward of each batch
  shape is captured once and replayed (at most :data:`MAX_GRAPHS` shapes kept, least
  recently used dropped); a capture that fails falls back to eager for that shape.
- **I/O overlaps compute**: a torch DataLoader with ``num_workers`` worker processes
  decodes images and masks (8-bit images travel as uint8), in pinned memory on CUDA,
  copied with ``non_blocking=True``; results are copied back into pinned buffers without
  blocking, and ``num_writers`` writer threads wait for the copy, post-process (OpenCV,
  optional) and encode the files while the GPU runs the next batch.

Only whole-image inference is batched (no ROI crops, no tiling). A batch that runs out of
CUDA memory is redone one image at a time with :func:`complete_with`, which falls back to
tiles when one image does not fit either.
"""

import contextlib
import copy
import queue
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from glcic_fast.imageio import array_to_tensor, read_image_array
from glcic_fast.inference.completion import NetworkInput, complete_with, from_rgb, padded_size, run_network, to_rgb
from glcic_fast.inference.masks import Rect, hole_mask
from glcic_fast.inference.tiling import first_that_fits

#: Most CUDA graphs kept at a time (each holds its own activation memory).
MAX_GRAPHS = 4


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


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


class Runner:
    """``net`` on batches: eager, or replaying one captured CUDA graph per input shape."""

    def __init__(self, net, cuda_graphs: bool):
        self.net = net
        self.cuda_graphs = cuda_graphs
        self.graphs = OrderedDict()
        self.failed = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        key = (tuple(x.shape), x.dtype)
        if not self.cuda_graphs or x.device.type != "cuda" or key in self.failed:
            return run_network(self.net, x)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(x)
            except Exception as exc:  # capture can fail (an op that is not capturable): run eagerly
                self.failed.add(key)
                warnings.warn(f"glcic_fast: CUDA graph capture failed for input {key[0]} {key[1]}, running "
                              f"that shape eagerly: {type(exc).__name__}: {exc}", RuntimeWarning)
            if key in self.failed:  # outside the except block: the failed capture's tensors are freed
                torch.cuda.synchronize()
                return self.net(x)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out  # consumed (stream-ordered) before the next replay

    def _capture(self, x):
        static_in = x.clone(memory_format=torch.channels_last)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: algorithm choices and caches settle outside the capture
                self.net(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": other threads keep calling CUDA while this one captures (the
        # DataLoader's pin-memory thread allocates pinned memory and queries events, the
        # writer threads wait on events). Under the default "global" mode those calls are
        # illegal during any thread's capture: they fail in those threads and invalidate
        # the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.net(static_in)
        return graph, static_in, static_out


class _Writers:
    """Threads that finish results: wait for the device-to-host copy, post-process the RGB,
    put it back in the input's channels (gray, RGBA), write the file (or hand the tensor
    back)."""

    def __init__(self, count: int, postprocess: bool, on_done: Optional[Callable[[int], None]], results=None):
        self.queue = queue.Queue(maxsize=max(4, 4 * count))
        self.postprocess = postprocess
        self.on_done = on_done
        self.results = results
        self.errors = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(max(1, count))]
        for t in self.threads:
            t.start()

    def put(self, item):
        if self.errors:
            raise self.errors[0]
        self.queue.put(item)

    def _run(self):
        from glcic_fast.imageio import write_image
        from glcic_fast.inference.postprocess import postprocess

        while True:
            item = self.queue.get()
            if item is None:
                return
            index, output, image, hole, event, original, sample_type = item
            try:
                if event is not None:
                    event.synchronize()
                if self.postprocess and hole.any():
                    image = postprocess(image, hole)
                if original is not None:
                    image = from_rgb(image, _as_float(original), hole)
                if output is not None:
                    write_image(output, image, sample_type)
                if self.results is not None:
                    self.results[index] = image
                if self.on_done is not None:
                    self.on_done(1)
            except Exception as exc:  # reported by put() / close()
                self.errors.append(exc)

    def close(self):
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


def _to_host(tensors, pinned: bool):
    """Copies device tensors to the host without blocking (pinned buffers); returns the
    host tensors and an event to wait on before reading them (None on the CPU)."""
    if tensors[0].device.type == "cpu":
        return tensors, None
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        host.copy_(t, non_blocking=pinned)
        hosts.append(host)
    event = torch.cuda.Event()
    event.record()
    return hosts, event


class _Engine:
    def __init__(self, net, device, dtype, batch_size, mask_threshold, cuda_graphs, writers):
        self.device, self.dtype = device, dtype
        self.net = net
        self.batch_size = batch_size
        self.mask_threshold = mask_threshold
        self.runner = Runner(net, cuda_graphs)
        self.writers = writers
        self.buckets = {}
        self.pinned = device.type == "cuda"

    def add(self, index, output, image, mask, sample_type="uint8"):
        """``image``: C x H x W (uint8, or float in [0, 1]; C = 1 gray, 3 RGB, 4 RGBA);
        ``mask``: 1 x H x W (uint8 255 = fill, or float in [0, 1]); ``sample_type``: what
        the output file is written with."""
        hole = _as_float(mask) > self.mask_threshold  # on the host: no device sync to test it
        if not hole.any():  # nothing to fill: the image as it is
            self.writers.put((index, output, _as_float(image), hole, None, None, sample_type))
            return
        original = image if image.shape[0] != 3 else None  # the channels the network does not see
        image = to_rgb(image).to(self.device, non_blocking=True)
        hole = hole.to(self.device, non_blocking=True)
        key = padded_size(*image.shape[-2:])
        bucket = self.buckets.setdefault(key, [])
        bucket.append((index, output, image, hole, original, sample_type))
        if len(bucket) >= self.batch_size:
            self._run(self.buckets.pop(key))

    def flush(self):
        for key in list(self.buckets):
            self._run(self.buckets.pop(key))

    def _run(self, batch):
        images = [_as_float(image)[None] for _, _, image, _, _, _ in batch]
        holes = [hole[None] for _, _, _, hole, _, _ in batch]

        def batched():
            inputs = []
            for image, hole in zip(images, holes):
                net_input = NetworkInput(self.net, image, hole.to(image.dtype), self.dtype)
                inputs.append(net_input.crop(net_input.whole()))
            with torch.inference_mode():
                y = self.runner(torch.cat(inputs))
                # Every result before any is handed on, so that running out of memory here
                # too leaves nothing half written for the fallback to redo.
                return [torch.where(hole, y[i:i + 1, :, :image.shape[-2], :image.shape[-1]].to(image.dtype), image)
                        for i, (image, hole) in enumerate(zip(images, holes))]

        def one_at_a_time():
            # Lazily, so that each result is handed on before the next is computed;
            # complete_with falls back to tiles when one image does not fit either.
            return (complete_with(self.net, image, hole.to(image.dtype)) for image, hole in zip(images, holes))

        results = first_that_fits([batched, one_at_a_time])
        for (index, output, _, _, original, sample_type), result, hole in zip(batch, results, holes):
            (host, host_hole), event = _to_host([result[0], hole[0]], self.pinned)
            self.writers.put((index, output, host, host_hole, event, original, sample_type))


def _on(device):
    """Makes ``device`` the current CUDA device (streams, events, graphs), e.g. cuda:3
    under torchrun; nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _prepare_net(net, device, dtype):
    from glcic_fast.devices import parse_dtype

    dtype = parse_dtype(dtype) if dtype is not None else next(net.parameters()).dtype
    param = next(net.parameters())
    if param.device != device or param.dtype != dtype:
        net = copy.deepcopy(net).to(device=device, dtype=dtype)
    return net.eval(), dtype


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
    device = torch.device(device) if device is not None else next(net.parameters()).device
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    net, dtype = _prepare_net(net, device, dtype)
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(JobDataset(jobs), batch_size=None, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if num_workers > 0 else None)
    writers = _Writers(num_writers, postprocess, on_done)
    engine = _Engine(net, device, dtype, batch_size, mask_threshold,
                     device.type == "cuda" if cuda_graphs is None else cuda_graphs, writers)
    try:
        with _on(device):
            for item in loader:
                if "error" in item:
                    raise ValueError(item["error"])
                i = item["index"]
                engine.add(i, jobs[i].output, item["image"], item["mask"], item["sample_type"])
            engine.flush()
    finally:
        writers.close()
    return Stats(len(jobs), time.perf_counter() - start)


def complete_many(net, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *, dtype=None,
                  batch_size: int = 4, mask_threshold: float = 0.5, postprocess: bool = False,
                  cuda_graphs: Optional[bool] = None) -> List[torch.Tensor]:
    """In-memory version: 3 x H x W images in [0, 1] (any sizes, on any device) and
    1 x H x W masks; returns the completed images (float32, on the CPU), in order."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    device = next(net.parameters()).device
    net, dtype = _prepare_net(net, device, dtype)
    results = [None] * len(images)
    writers = _Writers(1, postprocess, None, results)
    engine = _Engine(net, device, dtype, batch_size, mask_threshold,
                     device.type == "cuda" if cuda_graphs is None else cuda_graphs, writers)
    try:
        with _on(device):
            for i, (image, mask) in enumerate(zip(images, masks)):
                if image.dim() != 3 or image.shape[0] != 3 or mask.shape != (1,) + tuple(image.shape[-2:]):
                    raise ValueError(f"image {i}: expected 3 x H x W and a 1 x H x W mask, "
                                     f"got {tuple(image.shape)} and {tuple(mask.shape)}")
                engine.add(i, None, image, mask)
            engine.flush()
    finally:
        writers.close()
    return results
