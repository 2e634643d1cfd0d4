"""The throughput engine: every image completed exactly as complete_with completes it alone,
whatever it is batched with (same-size crops, crops grown to a larger batch, gray, RGBA,
no holes); batches formed as documented; one failing crop fails only its image; running out
of CUDA memory splits, then tiles; cancelled images are dropped; a full engine makes its
submitters wait without stalling."""

import concurrent.futures
import threading

import pytest
import torch

from glcic_fast import CompletionNet
from glcic_fast.inference import completion, engine as engine_module, roi
from glcic_fast.inference.completion import complete_with
from glcic_fast.inference.engine import Engine, grow
from glcic_fast.inference.roi import Box

from helpers import randomize
from photos import photo, rect_mask


@pytest.fixture(scope="module")
def net():
    return randomize(CompletionNet(), seed=3).eval()


def _pointwise_forward(calls=None, oom=lambda x: False, fail=lambda x: False):
    """A stand-in for the network (pointwise: exact under any crop or tile), recording its
    input shapes, raising CUDA out-of-memory or ValueError where told."""

    def forward(net, x):
        if calls is not None:
            calls.append(tuple(x.shape))
        if oom(x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if fail(x):
            raise ValueError("this crop fails (simulated)")
        return torch.sigmoid(x[:, :3] * 2 + x[:, 3:])

    return forward


def _recording_engine(net, **kw):
    batches = []
    eng = Engine(net, on_batch=lambda crops, pixels: batches.append((crops, pixels)), **kw)
    return eng, batches


def test_grow_keeps_the_crop_inside_the_padded_image_on_multiples_of_4():
    crop = Box(8, 360, 100, 452)
    assert grow(crop, 352, 352, 600, 640) == crop
    grown = grow(crop, 400, 420, 600, 640)
    assert (grown.y0, grown.x0) == (8, 100) and grown.y1 - grown.y0 == 400 and grown.x1 - grown.x0 == 420
    at_border = grow(Box(400, 600, 500, 640), 256, 200, 600, 640)  # cannot grow past the border: shifts
    assert at_border == Box(344, 600, 440, 640)
    for b in (grown, at_border):
        assert b.y0 % 4 == 0 and b.x0 % 4 == 0


def test_concurrent_images_equal_complete_with(net):
    """Two photos whose ROI crops differ in size (one grown to join the other's batch), a
    gray and an RGBA image, one without holes, submitted from threads."""
    big = [(photo("chelsea", 520, 600), rect_mask(520, 600, (100, 120, 40, 40))),
           (photo("coffee", 520, 600), rect_mask(520, 600, (300, 380, 56, 48)))]
    for image, mask in big:  # both take the ROI path, with crops of different sizes
        planned = roi.plan(mask[0] > 0.5)
        assert len(planned) == 1 and roi.worthwhile(planned, 520, 600)
    assert roi.plan(big[0][1][0] > 0.5)[0].crop.area != roi.plan(big[1][1][0] > 0.5)[0].crop.area
    gray = (photo("astronaut", 48, 64).mean(0, keepdim=True), rect_mask(48, 64, (10, 10, 20, 24)))
    rgba = (torch.cat([photo("rocket", 40, 52), torch.linspace(0, 1, 52).expand(1, 40, 52)]),
            rect_mask(40, 52, (0, 30, 20, 22)))
    none = (photo("chelsea", 32, 32), torch.zeros(1, 32, 32))
    cases = big + [gray, rgba, none]
    eng, batches = _recording_engine(net, max_batch=2, max_wait_ms=None, min_fill=0.5)
    with eng, concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = list(pool.map(lambda case: eng.submit(*case), cases))
    for (image, mask), future in zip(cases, futures):
        got = future.result()
        want = complete_with(net, image, mask)
        assert got.shape == image.shape and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-5
        outside = (mask <= 0.5).expand_as(image)
        assert torch.equal(got[outside], image[outside])
    assert torch.equal(futures[-1].result(), none[0])
    # The two ROI crops ran as one batch of the larger crop's size; nothing ran for the
    # image without holes.
    largest = max(r.crop.area for _, m in big for r in roi.plan(m[0] > 0.5))
    assert (2, 2 * largest) in batches
    assert sum(crops for crops, _ in batches) == 4


def test_crops_of_one_size_share_a_batch_and_others_wait_their_turn(monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "run_network", _pointwise_forward(calls))
    net = CompletionNet()
    small = [(torch.rand(3, 40, 60), rect_mask(40, 60, (5, 5, 10, 10))) for _ in range(3)]
    other = (torch.rand(3, 64, 64), rect_mask(64, 64, (5, 5, 10, 10)))
    eng, batches = _recording_engine(net, max_batch=3, max_wait_ms=None)
    with eng:
        futures = [eng.submit(*small[0]), eng.submit(*other), eng.submit(*small[1]), eng.submit(*small[2])]
    # The three 40 x 60 images (padded to 40 x 60) filled a batch; the 64 x 64 one ran alone
    # when the engine was closed.
    assert sorted(shape for shape in calls) == [(1, 4, 64, 64), (3, 4, 40, 60)]
    monkeypatch.setattr(completion, "run_network", _pointwise_forward())
    for (image, mask), f in zip([small[0], other, small[1], small[2]], futures):
        assert torch.equal(f.result(), complete_with(net, image, mask))


def test_max_wait_runs_a_partial_batch(monkeypatch):
    monkeypatch.setattr(engine_module, "run_network", _pointwise_forward())
    net = CompletionNet()
    with Engine(net, max_batch=8, max_wait_ms=1) as eng:
        future = eng.submit(torch.rand(3, 40, 60), rect_mask(40, 60, (5, 5, 10, 10)))
        future.result(timeout=30)  # a batch of one, once the wait is over: not at close


def test_a_failing_crop_fails_only_its_own_image(monkeypatch):
    marker = 0.123
    fail = lambda x: bool((x[:, 0, 0, 0] == marker).any())
    monkeypatch.setattr(engine_module, "run_network", _pointwise_forward(fail=fail))
    net = CompletionNet()
    images = [torch.rand(3, 40, 60) * 0.1 + 0.5 for _ in range(3)]
    images[1][0, 0, 0] = marker
    mask = rect_mask(40, 60, (20, 20, 10, 10))
    eng, batches = _recording_engine(net, max_batch=3, max_wait_ms=None)
    with eng:
        futures = [eng.submit(image, mask) for image in images]
    with pytest.raises(ValueError, match="this crop fails"):
        futures[1].result()
    monkeypatch.setattr(completion, "run_network", _pointwise_forward())
    for i in (0, 2):
        assert torch.equal(futures[i].result(), complete_with(net, images[i], mask))
    assert eng.pending_images() == 0


def test_out_of_memory_splits_the_batch_then_tiles(monkeypatch):
    calls, emptied = [], []
    monkeypatch.setattr(engine_module._tiling, "empty_cuda_cache", lambda: emptied.append(1))
    # Batches of more than one crop, and inputs over 500 x 500, do not fit.
    oom = lambda x: x.shape[0] > 1 or x.shape[-2] * x.shape[-1] > 500 * 500
    monkeypatch.setattr(engine_module, "run_network", _pointwise_forward(calls, oom=oom))
    net = CompletionNet()
    cases = [(torch.rand(3, 48, 64), rect_mask(48, 64, (10, 10, 20, 20))),
             (torch.rand(3, 48, 64), rect_mask(48, 64, (30, 30, 10, 20))),
             (torch.rand(3, 1200, 1000), rect_mask(1200, 1000, (100, 100, 900, 700)))]
    with Engine(net, max_batch=2, max_wait_ms=None) as eng:
        futures = [eng.submit(*case) for case in cases]
    monkeypatch.setattr(completion, "run_network", _pointwise_forward())
    for (image, mask), f in zip(cases, futures):
        assert torch.equal(f.result(), complete_with(net, image, mask))
    assert (2, 4, 48, 64) in calls and calls.count((1, 4, 48, 64)) == 2  # split in halves
    assert (1, 4, 1200, 1000) in calls  # the large image whole, then in tiles that fit
    tiles = calls[calls.index((1, 4, 1200, 1000)) + 1:]
    assert len(tiles) > 1 and all(s[0] == 1 and s[-2] * s[-1] <= 500 * 500 for s in tiles[-4:])
    assert emptied


def test_cancelled_images_are_dropped(monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "run_network", _pointwise_forward(calls))
    net = CompletionNet()
    eng = Engine(net, max_batch=4, max_wait_ms=None)
    keep = eng.submit(torch.rand(3, 40, 60), rect_mask(40, 60, (5, 5, 10, 10)))
    drop = eng.submit(torch.rand(3, 64, 80), rect_mask(64, 80, (5, 5, 10, 10)))
    assert eng.pending_images() == 2 and eng.queue_depth() == 2
    assert drop.cancel()
    assert eng.pending_images() == 1 and eng.queue_depth() == 1  # its place is free, its crop gone
    eng.close()
    assert keep.result().shape == (3, 40, 60) and drop.cancelled()
    assert calls == [(1, 4, 40, 60)]  # the cancelled image's crop never ran


def test_a_blocked_submitter_makes_the_engine_run_what_it_has(monkeypatch):
    """With no deadline, batches wait to fill; a submitter waiting for room must not wait
    for a batch that only its own image could fill."""
    monkeypatch.setattr(engine_module, "run_network", _pointwise_forward())
    net = CompletionNet()
    with Engine(net, max_batch=8, max_wait_ms=None, max_pending=2) as eng:
        futures = []
        done = threading.Event()

        def submit_all():
            for size in (40, 44, 48, 52):  # four sizes: no batch ever fills
                futures.append(eng.submit(torch.rand(3, size, 60), rect_mask(size, 60, (5, 5, 10, 10))))
            done.set()

        threading.Thread(target=submit_all, daemon=True).start()
        assert done.wait(60), "the submitter stayed blocked"
    assert all(f.result().shape[-2] == size for f, size in zip(futures, (40, 44, 48, 52)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_for_repeated_shapes_and_half_precision(net):
    cuda_net = randomize(CompletionNet(), seed=3).eval().cuda()
    image, mask = photo("chelsea", 256, 320), rect_mask(256, 320, (100, 120, 40, 40))
    want = complete_with(cuda_net, image.cuda(), mask.cuda()).cpu()
    eng = Engine(cuda_net, max_batch=2, max_wait_ms=0)
    with eng:
        results = [eng.submit(image, mask).result() for _ in range(3)]  # one shape, three times
    assert eng.runner.graphs and not eng.runner.failed  # captured on the second sighting
    for got in results:
        assert (got - want).abs().max().item() <= 1e-4
    with Engine(cuda_net, dtype="bfloat16", max_batch=2, max_wait_ms=0) as eng:
        half = eng.submit(image, mask).result()
    assert (half - want).abs().max().item() <= 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_map_the_output_like_every_other_path():
    """A net whose raw output is not the image (mmagic's: BGR in [-1, 1]) through the
    captured graphs: they must replay run_network, the net's output mapped to the image."""
    cuda_net = randomize(CompletionNet(bn_after_relu=False, output_activation="hardtanh"), seed=4).eval().cuda()
    image, mask = photo("chelsea", 256, 320), rect_mask(256, 320, (100, 120, 40, 40))
    want = complete_with(cuda_net, image.cuda(), mask.cuda()).cpu()
    with Engine(cuda_net, max_batch=2, max_wait_ms=0) as eng:
        results = [eng.submit(image, mask).result() for _ in range(3)]
        assert eng.runner.graphs and not eng.runner.failed
    for got in results:
        assert (got - want).abs().max().item() <= 1e-4
