"""``glcic-fast complete`` end to end: folders and single images, exit codes, never
overwriting inputs, clear errors for missing or mismatched masks; the batched pipeline."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import glcic_fast
from glcic_fast.cli import common
from glcic_fast.cli import commands as cli
from glcic_fast.inference.batching import complete_many
from glcic_fast.inference.completion import complete_with
from glcic_fast.imageio import read_image, read_mask

import helpers
from helpers import randomize
from photos import photo

REPO = helpers.REPO
SIZES = {"cat": ("chelsea", 64, 90), "cup": ("coffee", 64, 90), "astronaut": ("astronaut", 70, 51)}
# The command runs on the GPU where there is one, the CPU reference here: their fp32 outputs
# differ in the last bits (another summation order; cuDNN may use TF32), which moves a
# value that lies near a rounding boundary to the neighbouring 8-bit level. On the CPU
# both are the same computation: half a level.
_EIGHT_BIT_TOLERANCE = (1.5 if torch.cuda.is_available() else 0.5) / 255 + 1e-6


def _write_photo(path, name, h, w):
    rgb = (photo(name, h, w).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert cv2.imwrite(str(path), rgb[..., ::-1])


@pytest.fixture(scope="module")
def net():
    return randomize(glcic_fast.CompletionNet(), seed=4).eval()


@pytest.fixture(scope="module")
def weights(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "net.safetensors"
    glcic_fast.save(net, path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for stem, (name, h, w) in SIZES.items():
        _write_photo(images / f"{stem}.png", name, h, w)
        mask = np.zeros((h, w), np.uint8)
        mask[10:30, 12:40] = 255
        mask[h - 12:, w - 9:] = 255  # touches the bottom-right corner
        cv2.imwrite(str(masks / f"{stem}.png"), mask)
    return tmp_path


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv("GLCIC_FAST_WEIGHTS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def run(*argv):
    return cli.main([str(a) for a in argv])


def test_folder_end_to_end(folder, weights, net, capsys):
    out = folder / "out"
    rc = run("complete", folder / "images", "--masks", folder / "masks", "-o", out, "--weights", weights,
             "--no-postprocess", "--no-progress", "--workers", "1")
    assert rc == 0
    assert sorted(os.listdir(out)) == ["astronaut.png", "cat.png", "cup.png"]
    summary = capsys.readouterr().out
    assert "completed 3 images" in summary and "images/s" in summary
    for stem in SIZES:
        image, mask = read_image(folder / "images" / f"{stem}.png"), read_mask(folder / "masks" / f"{stem}.png")
        got = read_image(out / f"{stem}.png")
        assert got.shape == image.shape
        outside = (mask <= 0.5).expand_as(image)
        assert torch.equal(got[outside], image[outside])  # PNG is lossless: the outside is the input
        want = complete_with(net, image, mask)
        assert (got - want).abs().max().item() <= _EIGHT_BIT_TOLERANCE  # the same completion, in 8 bits


def test_folder_with_postprocess_and_rectangles(folder, weights):
    out = folder / "out"
    assert run("complete", folder / "images", "--rect", "5,5,20,20", "--rect", "0,40,10,30", "-o", out,
               "--weights", weights, "--no-progress", "--workers", "0") == 0
    image, got = read_image(folder / "images" / "cat.png"), read_image(out / "cat.png")
    hole = torch.zeros(1, 64, 90, dtype=torch.bool)
    hole[:, 5:25, 5:25] = hole[:, 40:70, 0:10] = True
    assert torch.equal(got[~hole.expand(3, -1, -1)], image[~hole.expand(3, -1, -1)])
    assert not torch.equal(got, image)


def test_never_overwrites(folder, weights, capsys):
    images, masks, out = folder / "images", folder / "masks", folder / "out"
    before = {p: p.read_bytes() for p in list(images.iterdir()) + list(masks.iterdir())}
    common = ["--weights", weights, "--no-progress", "--workers", "0"]
    assert run("complete", images, "--masks", masks, "-o", images, *common) == 2
    assert "input folder" in capsys.readouterr().err
    assert run("complete", images, "--masks", masks, "-o", masks, *common) == 2
    assert "mask folder" in capsys.readouterr().err
    assert run("complete", images / "cat.png", "--mask", masks / "cat.png", "-o", images / "cat.png", *common) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert run("complete", images / "cat.png", "--mask", masks / "cat.png", "-o", masks / "cat.png", *common) == 2
    assert {p: p.read_bytes() for p in before} == before

    assert run("complete", images, "--masks", masks, "-o", out, *common) == 0
    written = (out / "cat.png").stat().st_mtime_ns
    capsys.readouterr()
    assert run("complete", images, "--masks", masks, "-o", out, *common) == 2
    err = capsys.readouterr().err
    assert "3 output file(s) exist" in err and "--overwrite" in err and "cat.png" in err
    assert (out / "cat.png").stat().st_mtime_ns == written
    assert run("complete", images, "--masks", masks, "-o", out, "--overwrite", *common) == 0


def test_missing_and_mismatched_masks_are_listed(folder, weights, capsys):
    (folder / "masks" / "cup.png").unlink()
    cv2.imwrite(str(folder / "masks" / "astronaut.png"), np.zeros((10, 10), np.uint8))
    rc = run("complete", folder / "images", "--masks", folder / "masks", "-o", folder / "out", "--weights", weights)
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 image(s)" in err and "have no mask" in err and "cup.png" in err
    assert "differ in size" in err and "astronaut.png is 51 x 70" in err and "10 x 10" in err
    assert not (folder / "out").exists()  # nothing written


def test_single_image_with_rectangles(folder, weights, capsys):
    out = folder / "single.png"
    rc = run("complete", folder / "images" / "cat.png", "--rect", "10,10,30,20", "--rect", "70,50,30,30",
             "-o", out, "--weights", weights)
    assert rc == 0 and out.exists()
    assert "completed 1 image" in capsys.readouterr().out
    image, got = read_image(folder / "images" / "cat.png"), read_image(out)
    hole = torch.zeros(3, 64, 90, dtype=torch.bool)
    hole[:, 10:30, 10:40] = hole[:, 50:64, 70:90] = True
    assert torch.equal(got[~hole], image[~hole])
    assert not torch.equal(got[hole], image[hole])
    assert run("complete", folder / "images" / "cat.png", "--rect", "1,1,5,5", "-o", out, "--weights", weights) == 2
    assert "exists" in capsys.readouterr().err


def test_usage_errors(folder, weights, capsys):
    images, masks = folder / "images", folder / "masks"
    cases = [
        (["complete", images / "cat.png", "--rect", "1,1,5,5", "-o", folder / "o.png"], "no weights"),
        (["complete", images / "cat.png", "-o", folder / "o.png", "--weights", weights], "give the holes"),
        (["complete", images, "-o", folder / "o", "--weights", weights], "give the holes"),
        (["complete", folder / "nothing.png", "--rect", "1,1,5,5", "-o", folder / "o.png", "--weights", weights],
         "no such file"),
        (["complete", images / "cat.png", "--mask", masks / "cat.png", "-o", folder / "o.txt", "--weights", weights],
         "image extension"),
        (["complete", images / "cat.png", "--rect", "1,1,5,5", "-o", folder / "o.png", "--weights",
          folder / "missing.pth"], "cannot load weights"),
        (["complete", images, "--masks", masks, "--rect", "1,1,5,5", "-o", folder / "o", "--weights", weights],
         "either --masks"),
    ]
    for argv, message in cases:
        assert run(*argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exc:  # argparse's own errors exit with 2 as well
        run("complete", images / "cat.png", "--rect", "1,2,3", "-o", folder / "o.png")
    assert exc.value.code == 2


def test_random_weights_warn(folder, capsys):
    rc = run("complete", folder / "images" / "cat.png", "--rect", "1,1,20,20", "-o", folder / "r.png",
             "--random-weights")
    assert rc == 0 and "randomly initialised" in capsys.readouterr().err


def test_torchrun_ranks_take_every_world_size_th_file(folder, weights, monkeypatch):
    import torch as _torch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(common, "pick_device", lambda args, world, local: _torch.device("cpu"))  # no GPUs here
    out = folder / "out"
    assert run("complete", folder / "images", "--masks", folder / "masks", "-o", out, "--weights", weights,
               "--no-progress", "--workers", "0") == 0
    assert sorted(os.listdir(out)) == ["cat.png"]  # sorted: astronaut, cat, cup -> rank 1 of 2 takes cat


def test_exit_code_of_the_real_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("GLCIC_FAST_WEIGHTS", None)
    proc = subprocess.run([sys.executable, "-m", "glcic_fast.cli", "complete", str(tmp_path), "--masks",
                           str(tmp_path), "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "error" in proc.stderr


def test_complete_many_matches_one_at_a_time(net):
    """Buckets of mixed sizes give each image what complete_with gives it."""
    images = [photo("chelsea", 64, 90), photo("coffee", 63, 89), photo("astronaut", 40, 40), photo("chelsea", 62, 92)]
    masks = [torch.zeros(1, *im.shape[-2:]) for im in images]
    for m, (y, x) in zip(masks, [(10, 10), (30, 40), (0, 0), (40, 60)]):
        m[:, y:y + 20, x:x + 20] = 1
    masks[2].zero_()  # an image with nothing to fill
    out = complete_many(net, images, masks, batch_size=2)
    for got, image, mask in zip(out, images, masks):
        assert (got - complete_with(net, image, mask)).abs().max().item() <= 1e-5
    assert torch.equal(out[2], images[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_complete_many_on_cuda_with_graphs_and_half_precision(net):
    images = [photo("chelsea", 128, 128) for _ in range(3)]
    masks = [torch.zeros(1, 128, 128) for _ in range(3)]
    for m in masks:
        m[:, 40:80, 40:80] = 1
    import copy

    from glcic_fast.inference import engine  # where the Runner that complete_many's engine builds lives

    runners = []

    class RecordingRunner(engine.Runner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runners.append(self)

    cuda_net = copy.deepcopy(net).to("cuda")
    want = complete_with(cuda_net, images[0].cuda(), masks[0].cuda()).cpu()
    eager = complete_many(cuda_net, images, masks, batch_size=2, cuda_graphs=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "Runner", RecordingRunner)
        graphed = complete_many(cuda_net, images, masks, batch_size=2, cuda_graphs=True)
    # Both batch shapes (2 images, then the last one) were captured and replayed: a capture
    # that failed would have fallen back to eager and given the same numbers.
    assert len(runners) == 1 and not runners[0].failed, runners[0].failed
    assert sorted(shape[0] for shape, _ in runners[0].graphs) == [1, 2]
    for a, b in zip(eager, graphed):
        assert (a - b).abs().max().item() <= 1e-5
    assert (eager[0] - want).abs().max().item() <= 1e-4
    half = complete_many(cuda_net, images, masks, batch_size=2, dtype="bfloat16")
    assert (half[0] - want).abs().max().item() <= 0.1


def test_complete_many_redoes_a_batch_that_runs_out_of_memory(net, monkeypatch):
    from glcic_fast.inference import engine

    def oom(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.Runner, "__call__", oom)
    images = [photo("chelsea", 48, 64), photo("coffee", 48, 64)]
    masks = [torch.zeros(1, 48, 64) for _ in images]
    masks[0][:, 10:20, 10:30] = 1
    masks[1][:, 30:40, 40:60] = 1
    out = complete_many(net, images, masks, batch_size=2)
    for got, image, mask in zip(out, images, masks):
        assert torch.equal(got, complete_with(net, image, mask))


def _alpha_gray_and_deep_files(folder):
    """cat.png as RGBA with a varying alpha, cup.png as gray, astronaut.png as 16-bit RGB."""
    images = folder / "images"
    cat = cv2.imread(str(images / "cat.png"))
    alpha = np.tile(np.linspace(10, 250, cat.shape[1]).astype(np.uint8), (cat.shape[0], 1))
    cv2.imwrite(str(images / "cat.png"), np.dstack([cat, alpha]))
    cup = cv2.imread(str(images / "cup.png"))
    cv2.imwrite(str(images / "cup.png"), cv2.cvtColor(cup, cv2.COLOR_BGR2GRAY))
    astronaut = cv2.imread(str(images / "astronaut.png")).astype(np.uint16) * 257 + 3
    cv2.imwrite(str(images / "astronaut.png"), astronaut)


def _check_kept(source, written, mask, net):
    """``written`` holds ``source``'s channels and sample type, equal to it outside the holes
    and to complete_with's result inside them."""
    raw_in, raw_out = cv2.imread(str(source), cv2.IMREAD_UNCHANGED), cv2.imread(str(written), cv2.IMREAD_UNCHANGED)
    assert raw_out.dtype == raw_in.dtype and raw_out.shape == raw_in.shape
    hole = read_mask(mask)[0].numpy() > 0.5
    assert np.array_equal(raw_out[~hole], raw_in[~hole])
    if raw_in.ndim == 3 and raw_in.shape[2] == 4:
        assert np.array_equal(raw_out[..., 3], raw_in[..., 3])  # alpha untouched, holes included
    want = complete_with(net, read_image(source), read_mask(mask))
    scale = 65535 if raw_in.dtype == np.uint16 else 255
    assert (read_image(written) - want).abs().max().item() <= _EIGHT_BIT_TOLERANCE * 255 / scale + 1e-6


def test_folder_keeps_alpha_gray_and_16_bits(folder, weights, net):
    _alpha_gray_and_deep_files(folder)
    out = folder / "out"
    assert run("complete", folder / "images", "--masks", folder / "masks", "-o", out, "--weights", weights,
               "--no-postprocess", "--no-progress", "--workers", "1", "--batch-size", "3") == 0
    for stem in SIZES:
        _check_kept(folder / "images" / f"{stem}.png", out / f"{stem}.png", folder / "masks" / f"{stem}.png", net)


def test_single_image_keeps_alpha_gray_and_16_bits(folder, weights, net, capsys):
    _alpha_gray_and_deep_files(folder)
    for stem in SIZES:
        out = folder / f"single_{stem}.png"
        assert run("complete", folder / "images" / f"{stem}.png", "--mask", folder / "masks" / f"{stem}.png",
                   "-o", out, "--weights", weights, "--no-postprocess") == 0
        _check_kept(folder / "images" / f"{stem}.png", out, folder / "masks" / f"{stem}.png", net)
    # Alpha has nowhere to go in a JPEG: refused before anything runs, nothing written.
    jpg = folder / "cat.jpg"
    assert run("complete", folder / "images" / "cat.png", "--mask", folder / "masks" / "cat.png", "-o", jpg,
               "--weights", weights) == 2
    assert "alpha" in capsys.readouterr().err and not jpg.exists()


def test_folder_postprocess_keeps_alpha(folder, weights):
    _alpha_gray_and_deep_files(folder)
    out = folder / "out"
    assert run("complete", folder / "images", "--masks", folder / "masks", "-o", out, "--weights", weights,
               "--no-progress", "--workers", "0") == 0
    raw_in = cv2.imread(str(folder / "images" / "cat.png"), cv2.IMREAD_UNCHANGED)
    raw_out = cv2.imread(str(out / "cat.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(raw_out[..., 3], raw_in[..., 3])
    hole = read_mask(folder / "masks" / "cat.png")[0].numpy() > 0.5
    assert np.array_equal(raw_out[~hole], raw_in[~hole]) and not np.array_equal(raw_out[hole], raw_in[hole])


def test_bench_times_and_writes_the_completion_only_with_trained_weights(folder, weights, net, capsys, monkeypatch):
    from glcic_fast.inference import bench

    image, mask = folder / "images" / "cat.png", folder / "masks" / "cat.png"
    out = folder / "bench.png"
    monkeypatch.setattr(bench, "DEMO_WEIGHTS", str(folder / "no_demo.safetensors"))  # none bundled
    assert run("bench", "--image", image, "--mask", mask, "--repeats", "1", "-o", out) == 0
    printed = capsys.readouterr().out
    assert "reference (eager" in printed and "glcic_fast (" in printed and "random initialisation" in printed
    assert "not written" in printed and not out.exists()

    monkeypatch.setattr(bench, "DEMO_WEIGHTS", weights)  # a bundled checkpoint is the default
    assert run("bench", "--image", image, "--mask", mask, "--repeats", "1", "-o", out) == 0
    printed = capsys.readouterr().out
    assert "random initialisation" not in printed and f"-> {out}" in printed
    want = complete_with(net, read_image(image), read_mask(mask), postprocess=True)
    assert (read_image(out) - want).abs().max().item() <= _EIGHT_BIT_TOLERANCE

    assert run("bench", "--image", image, "--mask", mask, "--repeats", "1", "-o", image) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    # Half precision (a small crop: bf16 convolutions are slow on CPUs without native support).
    cv2.imwrite(str(folder / "small.png"), cv2.imread(str(image))[:16, :20])
    cv2.imwrite(str(folder / "small_mask.png"), cv2.imread(str(mask))[:16, :20])
    assert run("bench", "--image", folder / "small.png", "--mask", folder / "small_mask.png", "--repeats", "1",
               "--dtype", "bfloat16") == 0
    printed = capsys.readouterr().out
    assert "bfloat16" in printed
    diffs = [float(line.split()[-1]) for line in printed.splitlines() if line.startswith(("reference", "glcic_fast"))]
    assert len(diffs) == 2 and all(0 < d < 0.05 for d in diffs)  # bf16 rounding, measured against fp32
    assert run("bench", "--image", image, "--mask", folder / "masks" / "missing.png", "--repeats", "1") == 2
    assert "could not read a mask" in capsys.readouterr().err


def _one_line(err):
    """The stderr of a refused command: one line, the error, no traceback."""
    assert err.count("\n") == 1 and err.startswith("glcic-fast complete: error: ") and "Traceback" not in err, err
    return err


def test_files_over_the_decoder_limit_exit_2_with_one_line(folder, weights, capsys):
    from test_imageio import oversized_png  # tests/ is on the path (conftest.py)

    big = oversized_png(folder / "big.png")
    image, mask, out = folder / "images" / "cat.png", folder / "masks" / "cat.png", folder / "out.png"
    limit = "at most 1073741824 (2^30) pixels (CV_IO_MAX_IMAGE_PIXELS"
    assert run("complete", big, "--rect", "1,1,5,5", "-o", out, "--weights", weights) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"could not read an image from {big}" in err and limit in err
    assert run("complete", image, "--mask", big, "-o", out, "--weights", weights) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"could not read a mask from {big}" in err and limit in err
    assert not out.exists()

    # Folders: every file is checked before anything is written.
    os.replace(big, folder / "images" / "big.png")
    assert run("complete", folder / "images", "--rect", "1,1,5,5", "-o", folder / "o", "--weights", weights,
               "--no-progress") == 2
    err = capsys.readouterr().err
    assert "1 file(s) cannot be read" in err and f"{folder / 'images' / 'big.png'}: it is larger" in err
    assert limit in err and "Traceback" not in err and not (folder / "o").exists()
    os.replace(folder / "images" / "big.png", folder / "masks" / "cup.png")  # a mask this time
    assert run("complete", folder / "images", "--masks", folder / "masks", "-o", folder / "o", "--weights", weights,
               "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"{folder / 'masks' / 'cup.png'}: it is larger" in err and limit in err and not (folder / "o").exists()


def test_a_folder_with_a_side_over_the_decoder_limit_writes_nothing(folder, weights, capsys):
    """Pillow reads the header of a PNG over OpenCV's width limit, which OpenCV's decoder
    refuses: the check before writing must refuse it too, not the run halfway through."""
    from test_imageio import oversized_png

    oversized_png(folder / "images" / "wide.png", 1_100_000, 4)
    assert run("complete", folder / "images", "--rect", "1,1,5,5", "-o", folder / "o", "--weights", weights,
               "--no-progress") == 2
    err = capsys.readouterr().err
    assert "wide.png: it is larger" in err and "2^20) pixels wide" in err and not (folder / "o").exists()


def test_the_real_command_reports_a_file_over_the_decoder_limit_in_one_line(tmp_path, weights):
    from test_imageio import oversized_png

    big = oversized_png(tmp_path / "big.png")
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("GLCIC_FAST_WEIGHTS", None)
    proc = subprocess.run([sys.executable, "-m", "glcic_fast.cli", "complete", big, "--rect", "1,1,5,5", "-o",
                           str(tmp_path / "out.png"), "--weights", weights], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert big in proc.stderr and "1073741824" in proc.stderr and not (tmp_path / "out.png").exists()


def test_a_rectangle_outside_the_image(folder, weights, capsys):
    image, out = folder / "images" / "cat.png", folder / "single.png"  # cat.png is 90 x 64
    assert run("complete", image, "--rect", "10,10,5,5", "--rect", "100,10,5,5", "-o", out, "--weights", weights) == 2
    err = _one_line(capsys.readouterr().err)
    assert "rectangle 100,10,5,5" in err and "wholly outside" in err and "90 x 64" in err and not out.exists()

    # Partly outside: clipped, and said so on one line.
    assert run("complete", image, "--rect", "70,50,30,30", "-o", out, "--weights", weights, "--no-postprocess") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rect 70,50,30,30 reaches outside" in err and "90 x 64" in err
    assert "clipped to 70,50,20,14" in err
    got, source = read_image(out), read_image(image)
    hole = torch.zeros(3, 64, 90, dtype=torch.bool)
    hole[:, 50:, 70:] = True
    assert torch.equal(got[~hole], source[~hole]) and not torch.equal(got[hole], source[hole])


def test_a_rectangle_outside_some_images_of_a_folder(folder, weights, capsys):
    """The same rectangles apply to every image: wholly outside any of them is an error
    before anything is written; partly outside is clipped, one warning line per clipping."""
    out = folder / "out"
    common_args = ["--weights", weights, "--no-progress", "--workers", "0"]
    # astronaut.png is 51 x 70, cat.png and cup.png 90 x 64.
    assert run("complete", folder / "images", "--rect", "60,10,20,20", "-o", out, *common_args) == 2
    err = capsys.readouterr().err
    assert "--rect 60,10,20,20 lies wholly outside 1 image(s)" in err and "astronaut.png (51 x 70)" in err
    assert "cat.png" not in err and not out.exists()

    assert run("complete", folder / "images", "--rect", "40,60,20,20", "-o", out, *common_args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert sorted(warnings) == [
        "glcic-fast complete: warning: --rect 40,60,20,20 reaches outside 1 image(s), clipped to 40,60,11,10 "
        "there: astronaut.png",
        "glcic-fast complete: warning: --rect 40,60,20,20 reaches outside 2 image(s), clipped to 40,60,20,4 "
        "there: cat.png, cup.png"]
    assert sorted(os.listdir(out)) == ["astronaut.png", "cat.png", "cup.png"]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_does_not_decode_stops_a_folder_run_without_a_traceback(folder, weights, capsys, workers):
    """Its header reads (the checks before the run pass), its data does not: found while
    running, in a decoding worker process or not."""
    broken = folder / "images" / "cup.png"
    broken.write_bytes(broken.read_bytes()[:200])
    assert run("complete", folder / "images", "--rect", "5,5,10,10", "-o", folder / "out", "--weights", weights,
               "--no-progress", "--workers", str(workers)) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"could not read an image from {broken}" in err


def test_folder_through_the_engine_writes_the_files_of_the_whole_image_path(folder, weights, net, monkeypatch,
                                                                          shape_invariant_convs):
    """The folder command runs the throughput engine (ROI crops, batched across images);
    its files are byte for byte the files of the whole-image path it replaced (each image
    through the network whole, then written the same way), in fp32 with convolutions that
    compute a pixel the same way in any tensor size (see tests/conftest.py)."""
    from glcic_fast.imageio import write_image
    from glcic_fast.inference import engine

    _write_photo(folder / "images" / "big.png", "rocket", 480, 520)  # a hole small enough for ROI to pay
    mask = np.zeros((480, 520), np.uint8)
    mask[200:224, 300:324] = 255
    cv2.imwrite(str(folder / "masks" / "big.png"), mask)
    shapes = []
    forward = engine.run_network
    monkeypatch.setattr(engine, "run_network", lambda n, x: shapes.append(tuple(x.shape)) or forward(n, x))
    out, expected = folder / "out", folder / "expected"
    expected.mkdir()
    assert run("complete", folder / "images", "--masks", folder / "masks", "-o", out, "--weights", weights,
               "--no-progress", "--workers", "0", "--batch-size", "2") == 0
    assert any(s[-2:] != (480, 520) and s[-2] * s[-1] < 480 * 520 / 2 for s in shapes)  # big.png: a crop
    for name in sorted(os.listdir(folder / "images")):
        image, hole = read_image(folder / "images" / name), read_mask(folder / "masks" / name)
        write_image(expected / name, complete_with(net, image, hole, roi=False, postprocess=True))
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
