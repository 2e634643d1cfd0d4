"""The throughput engine: many images completed at once, each exactly as
:func:`glcic_fast.inference.completion.complete_with` completes it alone.

The HTTP service (:mod:`glcic_fast.serving`) and the folder pipeline
(:mod:`glcic_fast.inference.batching`) both submit images here.

- **Exact ROI crops.** Each image is planned as ``complete_with`` plans it
  (:func:`glcic_fast.inference.roi.plan` and :func:`~glcic_fast.inference.roi.worthwhile`:
  crops around the holes, or the whole padded image where that is cheaper), and each crop
  is one unit of work.
- **Cross-request batches.** Crops of one size, from any images, run as one batch: up to
  ``max_batch`` crops, waiting at most ``max_wait_ms`` after the oldest waiting crop
  arrived for others to join (``None``: until the batch is full, the submitters are
  blocked on ``max_pending`` or :meth:`Engine.close` flushes). A crop may also be grown to
  a larger batch's size when it then fills at least ``min_fill`` of it: a larger crop with
  its origin on a multiple of 4 that stays inside the padded image still gives the exact
  output on the crop's target (the argument of :mod:`glcic_fast.inference.roi` holds for any
  halo of at least the receptive-field radius). Growing costs the extra pixels, which pays
  on a GPU (small batches leave it idle) and not on a CPU (a batch of n crops costs n
  crops there): the default is 0.7 on CUDA and 1.0 (same size only) elsewhere.
- **dtype and backend.** The net runs in ``dtype`` (a converted copy where needed) and
  through its own dispatcher (the fastest backend for the device); inputs are
  channels_last.
- **CUDA graphs.** :class:`Runner` replays one captured graph per batch shape it has seen
  ``capture_after`` times (least recently used dropped past ``max_graphs``).
- **Out of memory.** A batch that runs out of CUDA memory is split in halves and run
  eagerly, down to single crops, and a single crop that still does not fit is tiled
  (:func:`glcic_fast.inference.tiling.first_that_fits`, the one fallback helper).
- **Isolation.** A batch that fails otherwise is redone one crop at a time, so that only the
  image whose crop fails gets the error. A cancelled future (a client that went away)
  drops its crops that have not run.
- **Threads.** One dispatcher thread does all device work (uploads, crops, forwards,
  copies back); ``finishers`` threads paste the crops' outputs into the image,
  post-process, restore the input's channels (gray, RGBA) and run the caller's ``then``
  (encode a PNG, write a file) while the device runs the next batch.
"""

import concurrent.futures
import contextlib
import copy
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from glcic_fast.inference import roi as _roi
from glcic_fast.inference import tiling as _tiling
from glcic_fast.inference.completion import NetworkInput, from_rgb, padded_size, run_network, to_rgb
from glcic_fast.inference.roi import Box, Region

#: Most CUDA graphs a :class:`Runner` keeps at a time (each holds its own activation memory).
MAX_GRAPHS = 4
#: ``min_fill`` on CUDA devices: a crop joins a larger batch when it fills 70% of its size.
CUDA_MIN_FILL = 0.7


class EngineClosed(RuntimeError):
    """The engine was closed: it takes no new images."""


def as_float(t: torch.Tensor) -> torch.Tensor:
    """An image or mask tensor in [0, 1] as float32 (uint8 divided by 255, as
    :func:`glcic_fast.imageio.array_to_tensor` does)."""
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


class Runner:
    """``net`` on batches: eager, or replaying one captured CUDA graph per input shape once
    that shape has been seen ``capture_after`` times."""

    def __init__(self, net, cuda_graphs: bool, capture_after: int = 1, max_graphs: int = MAX_GRAPHS):
        self.net = net
        self.cuda_graphs = cuda_graphs
        self.capture_after = capture_after
        self.max_graphs = max_graphs
        self.graphs = OrderedDict()
        self.failed = set()
        self.seen: Dict[tuple, int] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        key = (tuple(x.shape), x.dtype)
        if not self.cuda_graphs or x.device.type != "cuda" or key in self.failed:
            return run_network(self.net, x)
        if key not in self.graphs:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < self.capture_after:
                return run_network(self.net, x)
            try:
                self.graphs[key] = self._capture(x)
            except Exception as exc:  # capture can fail (an op that is not capturable): run eagerly
                self.failed.add(key)
                warnings.warn(f"glcic_fast: CUDA graph capture failed for input {key[0]} {key[1]}, running "
                              f"that shape eagerly: {type(exc).__name__}: {exc}", RuntimeWarning)
            if key in self.failed:  # outside the except block: the failed capture's tensors are freed
                torch.cuda.synchronize()
                return run_network(self.net, x)
            while len(self.graphs) > self.max_graphs:
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
                run_network(self.net, static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": other threads keep calling CUDA while this one captures (a
        # DataLoader's pin-memory thread allocates pinned memory and queries events, the
        # finisher threads wait on events). Under the default "global" mode those calls
        # are illegal during any thread's capture: they fail in those threads and
        # invalidate the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            # run_network, as every other path: the net's raw output mapped to the image
            # (mmagic's nets answer BGR in [-1, 1]).
            static_out = run_network(self.net, static_in)
        return graph, static_in, static_out


def grow(crop: Box, height: int, width: int, padded_height: int, padded_width: int) -> Box:
    """A ``height`` x ``width`` box (multiples of 4, at most the padded image's size) that
    contains ``crop`` (origin and size multiples of 4) and lies inside the padded image:
    it gives the same network output on the crop's target as the crop itself."""
    y0 = min(crop.y0, padded_height - height)
    x0 = min(crop.x0, padded_width - width)
    return Box(y0, y0 + height, x0, x0 + width)


@dataclass(eq=False)
class _Image:
    """One submitted image: its tensors on the host, what the finisher needs, the future."""
    image: torch.Tensor            # C x H x W, uint8 or float in [0, 1]
    hole: torch.Tensor             # 1 x H x W bool
    postprocess: bool
    then: Optional[Callable]
    future: concurrent.futures.Future
    padded: Tuple[int, int]
    remaining: int = 0
    pieces: list = field(default_factory=list)  # (target box, host output, event or None)
    network_input: Optional[NetworkInput] = None  # on the device, while its crops run
    failed: bool = False


@dataclass(eq=False)
class _Crop:
    owner: _Image
    region: Region
    arrival: float

    @property
    def shape(self) -> Tuple[int, int]:
        c = self.region.crop
        return c.y1 - c.y0, c.x1 - c.x0

    def fits(self, shape, min_fill: float) -> bool:
        """Can run as part of a batch of ``shape`` (grown to it, filling enough of it)."""
        (h, w), (bh, bw), (ph, pw) = self.shape, shape, self.owner.padded
        return h <= bh <= ph and w <= bw <= pw and h * w >= min_fill * bh * bw


class Engine:
    """Completes submitted images in cross-request batches (see the module's docstring).

    Args:
        net: a CompletionNet (used as it is when already on ``device`` in ``dtype``, else a
            converted copy); put in eval mode.
        device, dtype: where and in what precision the network runs (default: the net's).
        max_batch: most crops in one forward.
        max_wait_ms: how long the oldest waiting crop waits for others to fill its batch;
            None: until the batch is full, submitters are blocked or the engine flushes.
        max_pending: most images in the engine (waiting, running or finishing); then
            ``submit`` waits for room. None: no limit (the caller admits, as the HTTP
            service does with its ``max_queue``).
        min_fill: a crop joins a batch of a larger crop size when it fills at least this
            fraction of it (1.0: same size only). Default 0.7 on CUDA, 1.0 elsewhere.
        cuda_graphs: replay CUDA graphs for repeated batch shapes (default: on CUDA).
        capture_after, max_graphs: :class:`Runner`'s settings when none is given.
        runner: the callable that runs a batch (default a :class:`Runner`).
        finishers: threads that assemble, post-process and run ``then``.
        mask_threshold: mask values above it are holes.
        on_batch: called (from the dispatcher) with (crops, pixels) for every forward.
    """

    def __init__(self, net, *, device=None, dtype=None, max_batch: int = 8, max_wait_ms: Optional[float] = 5.0,
                 max_pending: Optional[int] = None, min_fill: Optional[float] = None,
                 cuda_graphs: Optional[bool] = None, capture_after: int = 2, max_graphs: int = 16,
                 runner: Optional[Callable] = None, finishers: int = 2, mask_threshold: float = 0.5,
                 on_batch: Optional[Callable[[int, int], None]] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms is not None and max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more (or None), got {max_wait_ms}")
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending must be at least 1 (or None), got {max_pending}")
        if not 0 <= mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold}")
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net, self.dtype = prepare_net(net, self.device, dtype)
        if min_fill is None:
            min_fill = CUDA_MIN_FILL if self.device.type == "cuda" else 1.0
        if not 0 < min_fill <= 1:
            raise ValueError(f"min_fill must be in (0, 1], got {min_fill}")
        cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.runner = runner if runner is not None else Runner(self.net, cuda_graphs, capture_after, max_graphs)
        self.max_batch, self.min_fill, self.mask_threshold = max_batch, min_fill, mask_threshold
        self.max_wait = None if max_wait_ms is None else max_wait_ms / 1000
        self.max_pending = max_pending
        self.on_batch = on_batch
        self._lock = threading.Condition()
        self._crops: List[_Crop] = []   # waiting, oldest first
        self._images = 0                # in the engine: waiting, running or finishing
        self._blocked = 0               # submitters waiting for room
        self._flushing = False
        self._closed = False
        self._pinned = self.device.type == "cuda"
        self._finishers = concurrent.futures.ThreadPoolExecutor(max(1, finishers), "glcic-finish")
        self._dispatcher = threading.Thread(target=self._dispatch, name="glcic-dispatch", daemon=True)
        self._dispatcher.start()

    # -- submitting ---------------------------------------------------------------------

    def submit(self, image: torch.Tensor, mask: torch.Tensor, *, postprocess: bool = False,
               then: Optional[Callable[[torch.Tensor], object]] = None) -> concurrent.futures.Future:
        """Queues one image; returns a future of the completed image (C x H x W float32 on
        the CPU, the input's channels), or of ``then(image)`` when ``then`` is given.

        ``image``: C x H x W (C = 1, 3 or 4), uint8 or floating point in [0, 1], on the CPU;
        ``mask``: 1 x H x W, uint8 (255 = fill), bool or floating point in [0, 1]. Cancelling
        the future drops the image's crops that have not run. With ``max_pending`` images
        in the engine, waits for room."""
        if image.dim() != 3 or image.shape[0] not in (1, 3, 4) or mask.shape != (1,) + tuple(image.shape[-2:]):
            raise ValueError(f"expected a C x H x W image (C = 1, 3 or 4) and a 1 x H x W mask, "
                             f"got {tuple(image.shape)} and {tuple(mask.shape)}")
        image, mask = image.cpu(), mask.cpu()
        hole = (as_float(mask) > self.mask_threshold) if mask.dtype != torch.bool else mask
        future = concurrent.futures.Future()
        item = _Image(image, hole, postprocess, then, future, padded_size(*image.shape[-2:]))
        regions = self._plan(item) if hole.any() else []
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed: it takes no new images")
            if self.max_pending is not None and self._images >= self.max_pending:
                self._blocked += 1
                self._lock.notify_all()  # a dispatcher waiting for a fuller batch runs now
                while self._images >= self.max_pending and not self._closed:
                    self._lock.wait()
                self._blocked -= 1
                if self._closed:
                    raise EngineClosed("the engine closed while waiting for room")
            self._images += 1
            if not regions:  # nothing to fill: the image as it is, without the network
                self._finishers.submit(self._finish, item)
                return future
            now = time.monotonic()
            item.remaining = len(regions)
            self._crops.extend(_Crop(item, region, now) for region in regions)
            self._lock.notify_all()
        future.add_done_callback(lambda _: self._on_cancel(item))
        return future

    def _plan(self, item: _Image) -> List[Region]:
        """The crops ``complete_with`` would run for this image alone."""
        return _roi.regions_to_run(item.hole[0], *item.padded)

    def queue_depth(self) -> int:
        """Crops waiting for the network."""
        with self._lock:
            return len(self._crops)

    def pending_images(self) -> int:
        """Images in the engine (waiting, running or finishing)."""
        with self._lock:
            return self._images

    def alive(self) -> bool:
        """The dispatcher thread is running (False once closed)."""
        return self._dispatcher.is_alive()

    def close(self) -> None:
        """Takes no new images, runs what is waiting (without waiting for fuller batches)
        and returns once everything submitted has finished."""
        with self._lock:
            self._closed = True
            self._flushing = True
            self._lock.notify_all()
        self._dispatcher.join()
        self._finishers.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the dispatcher -----------------------------------------------------------------

    def _dispatch(self):
        with contextlib.ExitStack() as stack:
            if self.device.type == "cuda":  # e.g. cuda:3 under torchrun: streams, events, graphs there
                stack.enter_context(torch.cuda.device(self.device))
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                try:
                    self._run(*batch)
                except Exception as exc:  # e.g. out of memory uploading an image: its batch fails, not the engine
                    for c in batch[0]:
                        self._fail(c.owner, exc)

    def _next_batch(self):
        """(crops, shape) to run next, or None once closed and drained."""
        with self._lock:
            while True:
                self._crops = [c for c in self._crops if not self._abandoned(c.owner)]
                if not self._crops:
                    if self._closed:
                        return None
                    self._lock.wait()
                    continue
                crops, shape = self._choose(self._crops[0])
                oldest = self._crops[0].arrival
                due = (self._flushing or self._blocked or len(crops) >= self.max_batch
                       or (self.max_wait is not None and time.monotonic() >= oldest + self.max_wait))
                if not due:  # a full batch of another size need not wait for the oldest crop's
                    crops, shape = self._full_batch() or (crops, shape)
                    due = len(crops) >= self.max_batch
                if due:
                    taken = set(map(id, crops))
                    self._crops = [c for c in self._crops if id(c) not in taken]
                    return crops, shape
                timeout = None if self.max_wait is None else oldest + self.max_wait - time.monotonic()
                self._lock.wait(timeout)

    def _abandoned(self, item: _Image) -> bool:
        """Cancelled by the caller, or failed in another crop: its crops need not run."""
        if item.failed or item.future.cancelled():
            if item.remaining:  # its place is free (crops of it that are running are dropped when done)
                item.remaining = 0
                self._images -= 1
                self._lock.notify_all()
            return True
        return False

    def _on_cancel(self, item: _Image):
        if item.future.cancelled():
            with self._lock:
                self._abandoned(item)
                self._crops = [c for c in self._crops if c.owner is not item]

    def _choose(self, leader: _Crop):
        """The batch for ``leader``: among the sizes it can grow to (its own, or its size
        joined with another waiting crop's), the one that the most waiting crops fit (ties:
        the smallest), those crops oldest first, at most ``max_batch``."""
        shapes = {leader.shape}
        if self.min_fill < 1:
            shapes |= {(max(leader.shape[0], c.shape[0]), max(leader.shape[1], c.shape[1])) for c in self._crops}
        best = None
        for shape in shapes:
            if not leader.fits(shape, self.min_fill):
                continue
            members = [c for c in self._crops if c.fits(shape, self.min_fill)][:self.max_batch]
            if leader not in members:  # older crops took every place
                continue
            key = (-len(members), shape[0] * shape[1])
            if best is None or key < best[0]:
                best = (key, members, shape)
        return best[1], best[2]  # the leader's own size always qualifies

    def _full_batch(self):
        """(crops, shape) of a full batch of one crop size, if the waiting crops make one."""
        by_shape: Dict[tuple, List[_Crop]] = {}
        for c in self._crops:
            group = by_shape.setdefault(c.shape, [])
            group.append(c)
            if len(group) == self.max_batch:
                return group, c.shape
        return None

    def _run(self, crops: List[_Crop], shape):
        for c in crops:  # the image on the device once, for all of its crops
            if c.owner.network_input is None:
                c.owner.network_input = self._network_input(c.owner)
        try:
            outputs = self._outputs(crops, shape)
        except Exception as exc:
            if len(crops) == 1:
                self._fail(crops[0].owner, exc)
                return
            outputs = []
            for c in crops:  # one at a time: only the image whose crop fails gets the error
                try:
                    outputs += self._outputs([c], shape)
                except Exception as single:
                    self._fail(c.owner, single)
                    outputs.append(None)
        if self.on_batch is not None:
            self.on_batch(len(crops), len(crops) * shape[0] * shape[1])
        for c, out in zip(crops, outputs):
            if out is not None:
                self._done(c, out)

    def _network_input(self, item: _Image) -> NetworkInput:
        image = to_rgb(as_float(item.image.to(self.device, non_blocking=True)))[None]
        hole = item.hole.to(self.device, non_blocking=True)[None].to(image.dtype)
        return NetworkInput(self.net, image, hole, self.dtype)

    @staticmethod
    def _target(c: _Crop) -> Box:
        """The crop's target clipped to the image (the whole-image crop's target is padded)."""
        return c.region.target.clipped(*c.owner.image.shape[-2:])

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return run_network(self.net, x.contiguous(memory_format=torch.channels_last))

    def _outputs(self, crops: List[_Crop], shape, forward=None) -> List[torch.Tensor]:
        """The network's output on each crop's target (on the device), through ``forward``
        (default the runner). Out of CUDA memory: halves, then single crops, eagerly (a
        CUDA graph's private memory pool is what may not fit), then tiles."""
        forward = forward or self.runner
        attempts = [lambda: self._batch(crops, shape, forward)]
        if len(crops) > 1:
            half = len(crops) // 2
            attempts.append(lambda: (self._outputs(crops[:half], shape, self._eager)
                                     + self._outputs(crops[half:], shape, self._eager)))
        else:
            if forward != self._eager:
                attempts.append(lambda: self._batch(crops, shape, self._eager))
            attempts += [lambda core=core: [self._tiled(crops[0], core)]
                         for core in _tiling.auto_cores(crops[0].region.crop)]
        return _tiling.first_that_fits(attempts)

    def _batch(self, crops: List[_Crop], shape, forward) -> List[torch.Tensor]:
        """One forward over the crops, each grown to ``shape``; every output is cut before
        any is handed on, so that running out of memory leaves nothing half done."""
        boxes = [grow(c.region.crop, *shape, *c.owner.padded) for c in crops]
        with torch.inference_mode():
            y = forward(torch.cat([c.owner.network_input.crop(b) for c, b in zip(crops, boxes)]))
            outputs = []
            for i, (c, b) in enumerate(zip(crops, boxes)):
                t = self._target(c)
                outputs.append(y[i:i + 1, :, t.y0 - b.y0:t.y1 - b.y0, t.x0 - b.x0:t.x1 - b.x0])
            return outputs

    def _tiled(self, c: _Crop, core: int) -> torch.Tensor:
        inp, t = c.owner.network_input, self._target(c)
        out = torch.zeros(1, 3, t.y1 - t.y0, t.x1 - t.x0, dtype=self.dtype, device=self.device)
        forward = lambda box: run_network(self.net, inp.crop(box))
        with torch.inference_mode():
            _tiling.run_tiled(forward, t, core, *c.owner.padded, out, out_origin=(t.y0, t.x0))
        return out

    def _done(self, c: _Crop, out: torch.Tensor):
        item = c.owner
        if self.device.type == "cpu":
            host, event = out[0].clone(), None  # a view of the batch's output: copied out of it
        else:
            host = torch.empty(out.shape[1:], dtype=out.dtype, pin_memory=self._pinned)
            host.copy_(out[0], non_blocking=self._pinned)
            event = torch.cuda.Event()
            event.record()
        with self._lock:
            if item.remaining == 0:  # dropped meanwhile
                return
            item.pieces.append((self._target(c), host, event))
            item.remaining -= 1
            finished = item.remaining == 0
            if finished:
                item.network_input = None
        if finished:
            self._finishers.submit(self._finish, item)

    def _fail(self, item: _Image, exc: BaseException):
        with self._lock:
            if item.failed:
                return
            item.failed = True
            if item.remaining:
                item.remaining = 0
                self._images -= 1
                self._lock.notify_all()
        if not item.future.cancelled():
            item.future.set_exception(exc)

    # -- the finishers --------------------------------------------------------------------

    def _finish(self, item: _Image):
        try:
            result = self._assemble(item)
            if item.then is not None:
                result = item.then(result)
        except Exception as exc:
            outcome = ("exception", exc)
        else:
            outcome = ("result", result)
        finally:
            with self._lock:
                self._images -= 1
                self._lock.notify_all()
        if item.future.cancelled():
            return
        try:
            getattr(item.future, f"set_{outcome[0]}")(outcome[1])
        except concurrent.futures.InvalidStateError:  # cancelled in between
            pass

    @staticmethod
    def _assemble(item: _Image) -> torch.Tensor:
        """What complete_with returns for the image: the network's output in the holes, the
        input elsewhere, post-processed if asked, in the input's channels."""
        image = as_float(item.image)
        if not item.pieces:
            return image.clone()
        completed = to_rgb(image).clone()
        for box, host, event in item.pieces:
            if event is not None:
                event.synchronize()
            ys, xs = box.slices()
            completed[:, ys, xs] = torch.where(item.hole[:, ys, xs], host.float(), completed[:, ys, xs])
        if item.postprocess:
            from glcic_fast.inference.postprocess import postprocess

            completed = postprocess(completed, item.hole)
        return from_rgb(completed, image, item.hole)


def prepare_net(net, device, dtype):
    """(``net`` on ``device`` in ``dtype``, in eval mode: the net itself when it already is,
    else a converted copy; the dtype)."""
    from glcic_fast.devices import parse_dtype

    dtype = parse_dtype(dtype) if dtype is not None else next(net.parameters()).dtype
    param = next(net.parameters())
    if param.device != device or param.dtype != dtype:
        net = copy.deepcopy(net).to(device=device, dtype=dtype)
    return net.eval(), dtype
