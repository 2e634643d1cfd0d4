"""Hostile weights files: each is refused with a WeightsError, quickly, without reading
memory outside the file's buffers, crashing the process, or running its code."""

import os
import struct
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch

import glcic_fast
from glcic_fast import WeightsError
from glcic_fast.nn import weights

from glcic_fast.nn.architecture import COMPLETION_LAYERS
from glcic_fast.nn.completion_net import PLACES2_MEAN_PIXEL

from t7_writer import NUMBER, TABLE, RawTensor, authors_sequential, authors_t7_table, write_t7



# ------------------------------------------------------------------ .t7: tensor headers vs. storages

BIAS_VALUES = COMPLETION_LAYERS[0].out_channels


@pytest.fixture(scope="module")
def authors_table():
    return authors_t7_table(authors_sequential(seed=0), PLACES2_MEAN_PIXEL)


def _authors_t7_with_first_bias(path, table, bias):
    """The authors' release, its first convolution's bias replaced by ``bias``."""
    modules = table["model"].fields["modules"]
    first = modules[0]
    modules[0] = type(first)(first.name, {**first.fields, "bias": bias})
    try:
        write_t7(path, table)
    finally:
        modules[0] = first


def test_t7_bias_past_its_storage_is_refused(tmp_path, authors_table):
    """torchfile alone loads this model with heap memory in its first bias."""
    path = tmp_path / "completionnet_places2.t7"
    _authors_t7_with_first_bias(path, authors_table, RawTensor([0.5], size=[BIAS_VALUES], stride=[1]))
    with pytest.raises(WeightsError, match=f"reaches value {BIAS_VALUES} of a storage of 1"):
        glcic_fast.load(path)


@pytest.mark.parametrize("tensor, problem", [
    (RawTensor(np.zeros(4), size=[2, 2], stride=[2, 2]), "reaches value 5 of a storage of 4"),
    (RawTensor(np.zeros(4), size=[2], stride=[1], offset=4), "reaches value 5 of a storage of 4"),
    (RawTensor(np.zeros(4), size=[2], stride=[1], offset=0), "expected none negative"),
    (RawTensor(np.zeros(4), size=[-2], stride=[1]), "expected none negative"),
    (RawTensor(np.zeros(4), size=[2], stride=[-1], offset=2), "expected none negative"),
], ids=["strides-past-storage", "offset-past-storage", "offset-0", "negative-size",
        "negative-stride"])
def test_t7_tensor_header_outside_its_storage_is_refused(tmp_path, tensor, problem):
    path = tmp_path / "completionnet_places2.t7"
    write_t7(path, {"model": {"bias": tensor}, "mean": np.zeros(3)})
    with pytest.raises(WeightsError, match=problem):
        glcic_fast.load(path)


def test_t7_tensor_views_that_fit_still_load(tmp_path):
    """The checks let through what Torch7 writes: offsets, strides 0 (expanded tensors)."""
    import torchfile

    path = tmp_path / "views.t7"
    storage = np.arange(6, dtype=np.float32)
    write_t7(path, {"tail": RawTensor(storage, size=[2], stride=[2], offset=4),
                    "expanded": RawTensor(storage, size=[2, 3], stride=[0, 1], offset=1)})
    with weights._strict_torchfile_readers(torchfile):
        table = torchfile.load(str(path), utf8_decode_strings=True)
    np.testing.assert_array_equal(table["tail"], [3, 5])
    np.testing.assert_array_equal(table["expanded"], [[0, 1, 2], [0, 1, 2]])


def test_t7_huge_stride_is_refused_without_crashing(tmp_path, authors_table):
    """torchfile alone views memory 4e11 bytes away, and reading the bias kills the process
    (SIGSEGV). Run in a subprocess, so that a regression kills it, not the test run."""
    path = tmp_path / "completionnet_places2.t7"
    _authors_t7_with_first_bias(path, authors_table, RawTensor(np.zeros(4), size=[BIAS_VALUES], stride=[10 ** 11]))
    script = ("import sys, glcic_fast\n"
              "try:\n    glcic_fast.load(sys.argv[1])\n"
              "except glcic_fast.WeightsError as exc:\n    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    assert "refused:" in done.stdout and "reaches value" in done.stdout


def test_t7_deeply_nested_tables_are_refused(tmp_path):
    path = tmp_path / "deep.t7"
    depth = 20000  # far past Python's recursion limit
    with open(path, "wb") as f:
        for index in range(1, depth + 1):  # {[1] = {[1] = ... }}
            f.write(struct.pack("<iii", TABLE, index, 1) + struct.pack("<id", NUMBER, 1.0))
        f.write(struct.pack("<iii", TABLE, depth + 1, 0))
    with pytest.raises(WeightsError, match="could not read .* as a Torch7 file .*RecursionError"):
        glcic_fast.load(path)


# ------------------------------------------------------------------ checkpoints: placeholders' cost

def _checkpoint_naming(path, count, *, zip_format, monkeypatch):
    """A checkpoint holding objects of ``count`` distinct classes numpy.x0, numpy.x1, ...
    (numpy is read as placeholders): pickled by reference, so each is one global."""
    objects = []
    for i in range(count):
        cls = type(f"x{i}", (), {"__module__": "numpy"})
        monkeypatch.setattr(np, f"x{i}", cls, raising=False)
        objects.append(cls())
    torch.save({"state_dict": {"w": torch.zeros(1)}, "log": objects}, path, _use_new_zipfile_serialization=zip_format)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_many_placeholder_names_are_refused_after_few_reads(tmp_path, monkeypatch, zip_format):
    path = tmp_path / "names.pth"
    names = 3 * weights._MAX_PLACEHOLDERS
    _checkpoint_naming(path, names, zip_format=zip_format, monkeypatch=monkeypatch)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    with pytest.raises(WeightsError, match="numpy / mmengine / mmcv / mmagic globals"):
        weights._load_weights_only(path)
    # zip: one read, then torch's static scan names them all; legacy: one read per name.
    assert len(reads) == (1 if zip_format else weights._MAX_PLACEHOLDERS + 1) < names


def test_a_few_placeholder_names_still_load(tmp_path, monkeypatch):
    path = tmp_path / "names.pth"
    _checkpoint_naming(path, 5, zip_format=False, monkeypatch=monkeypatch)
    loaded = weights._load_weights_only(path)
    assert len(loaded["log"]) == 5 and all(isinstance(o, weights._Unread) for o in loaded["log"])


# ------------------------------------------------------------------ checkpoints: zip records

def _repacked(source, target, compression):
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", compression=compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def test_compressed_zip_checkpoint_is_refused_before_inflating(tmp_path, monkeypatch):
    saved, bomb = tmp_path / "saved.pth", tmp_path / "bomb.pth"
    torch.save({"w": torch.zeros(1 << 20)}, saved)  # 4 MiB of zeros: deflates to a few KiB
    _repacked(saved, bomb, zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bomb) < os.path.getsize(saved) / 100
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a compressed zip"))
    with pytest.raises(WeightsError, match="compressed"):
        glcic_fast.load(bomb)


def test_zip_records_claiming_more_than_the_file_are_refused(tmp_path):
    path = tmp_path / "claims.pth"
    torch.save({"w": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")  # the first central directory record
    struct.pack_into("<I", data, central + 24, 1 << 31)  # its uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"claim \d+ bytes in a file of \d+ bytes"):
        glcic_fast.load(path)


def test_zip_checkpoint_as_torch_writes_it_loads(tmp_path):
    path = tmp_path / "stored.pth"
    torch.save({"w": torch.arange(3.0)}, path)
    _repacked(path, tmp_path / "restored.pth", zipfile.ZIP_STORED)  # stored records, as torch writes
    assert torch.equal(weights._load_weights_only(tmp_path / "restored.pth")["w"], torch.arange(3.0))


# ------------------------------------------------------------------ checkpoints: torch's scan fails

@pytest.mark.parametrize("protocol", [4, 5])
def test_checkpoint_torch_cannot_scan_is_a_weights_error(tmp_path, protocol):
    """torch's static scan of a zip checkpoint refuses protocol 4/5 opcodes with a raw
    UnpicklingError: it must come out as WeightsError (the CLI's clear message, exit 2)."""
    path = tmp_path / "p.pth"
    torch.save({"w": torch.zeros(2), "n": np.float64(1.0)}, path, pickle_protocol=protocol)
    with pytest.raises(WeightsError, match="could not read .* as a PyTorch checkpoint"):
        glcic_fast.load(path)


# ------------------------------------------------------------------ checkpoints: one load at a time

def test_loads_do_not_overlap(tmp_path, monkeypatch):
    """safe_globals swaps torch's allowlist for the whole process: two threads loading at
    once would run under (and restore over) each other's."""
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, path)
    inside, most_inside, guard = [0], [0], threading.Lock()
    real_load = torch.load

    def slow_load(*args, **kwargs):
        with guard:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
        threading.Event().wait(0.2)  # long enough for the other thread to arrive
        with guard:
            inside[0] -= 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", slow_load)
    threads = [threading.Thread(target=weights._load_weights_only, args=(path,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert most_inside[0] == 1


def test_cli_reports_a_checkpoint_torch_cannot_scan(tmp_path, capsys):
    import cv2

    from glcic_fast.cli import commands as cli

    image_path, mask_path, out = tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "out.png"
    assert cv2.imwrite(str(image_path), np.full((32, 32, 3), 128, np.uint8))
    assert cv2.imwrite(str(mask_path), np.pad(np.full((8, 8), 255, np.uint8), 12))
    torch.save({"w": torch.zeros(2), "n": np.float64(1.0)}, tmp_path / "p4.pth", pickle_protocol=4)
    capsys.readouterr()
    rc = cli.main(["complete", str(image_path), "--mask", str(mask_path), "-o", str(out),
                   "--weights", str(tmp_path / "p4.pth"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "could not read" in err and "Traceback" not in err
