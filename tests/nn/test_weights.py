"""Every weight layout loads and gives its own reference graph's outputs; ours is lossless;
bad files get clear errors and never run code or lose a file."""

import json
import os
import pickle

import pytest
import torch

import glcic_fast
from glcic_fast import CompletionNet, WeightsError
from glcic_fast.nn.reference import ReferenceCompletionNet

from helpers import randomize
from t7_writer import authors_sequential, authors_t7_table, write_t7

X = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.3


def outputs_match(net, reference_graph):
    net.eval()
    with torch.inference_mode():
        return (net(X) - reference_graph(X)).abs().max().item() <= 1e-4


def test_glcic_pytorch_checkpoint_with_config(tmp_path):
    ref = randomize(ReferenceCompletionNet(bn_after_relu=True), seed=1).eval()
    path = tmp_path / "model_cn"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)  # multi-GPU prefix
    (tmp_path / "config.json").write_text(json.dumps({"mpv": [0.5, 0.4, 0.3], "arc": "places2"}))
    net = glcic_fast.load(str(path))
    assert net.bn_after_relu and net.input_convention == glcic_fast.MEAN_FILLED_HOLE
    assert torch.allclose(net.mean_pixel, torch.tensor([0.5, 0.4, 0.3]))
    assert "GLCIC-PyTorch" in net.weights_source
    assert outputs_match(net, ref)


def test_glcic_pytorch_old_config_with_scalar_mpv(tmp_path):
    ref = randomize(ReferenceCompletionNet(bn_after_relu=True), seed=2)
    torch.save(ref.state_dict(), tmp_path / "model_cn")
    net = glcic_fast.load(tmp_path / "model_cn", config={"mpv": 0.45})
    assert torch.allclose(net.mean_pixel, torch.full((3,), 0.45))


def test_glcic_pytorch_without_config_says_what_is_missing(tmp_path):
    torch.save(ReferenceCompletionNet(True).state_dict(), tmp_path / "model_cn")
    with pytest.raises(WeightsError, match="config.json"):
        glcic_fast.load(tmp_path / "model_cn")


def test_authors_sequential_pth(tmp_path):
    seq = authors_sequential(seed=3)
    torch.save(seq.state_dict(), tmp_path / "completionnet_places2.pth")
    net = glcic_fast.load(tmp_path / "completionnet_places2.pth")
    assert not net.bn_after_relu and net.input_convention == glcic_fast.MEAN_SUBTRACTED_ZERO_HOLE
    assert outputs_match(net, seq)
    # load_state_dict of a CompletionNet takes the same layout directly.
    direct = CompletionNet()
    direct.load_state_dict(seq.state_dict())
    assert outputs_match(direct, seq)


@pytest.mark.parametrize("old_bn", [False, True])
def test_authors_t7(tmp_path, old_bn):
    seq = authors_sequential(seed=4)
    path = tmp_path / "completionnet_places2.t7"
    write_t7(path, authors_t7_table(seq, [0.4560, 0.4472, 0.4155], old_bn))
    net = glcic_fast.load(path)
    assert "Torch7" in net.weights_source
    assert torch.allclose(net.mean_pixel, torch.tensor([0.4560, 0.4472, 0.4155]))
    net.eval()
    with torch.inference_mode():
        assert (net(X) - seq(X)).abs().max().item() <= (1e-4 if not old_bn else 1e-3)


@pytest.mark.parametrize("name,what", [
    ("completionnet_places2_freeform.t7", "places2, trained with free-form holes"),
    ("completionnet_places2.t7", "places2, trained with rectangular holes"),
    ("completionnet_celeba.t7", "CelebA faces"),
    ("my_finetune.t7", None),
])
def test_the_authors_models_are_named_by_their_file_names(tmp_path, name, what):
    """The three releases share one structure and convention (their inpaint.lua runs each
    alike); the loader says which one it holds where the file name tells."""
    seq = authors_sequential(seed=6)
    path = tmp_path / name
    write_t7(path, authors_t7_table(seq, [0.4560, 0.4472, 0.4155]))
    net = glcic_fast.load(path)
    assert not net.bn_after_relu and net.input_convention == glcic_fast.MEAN_SUBTRACTED_ZERO_HOLE
    assert net.output_activation == "sigmoid"
    if what is None:
        assert net.weights_source == f"authors' Torch7 ({path})"
    else:
        assert what in net.weights_source and str(path) in net.weights_source
    assert outputs_match(net, seq)


def test_t7_truncated(tmp_path):
    path = tmp_path / "cut.t7"
    write_t7(path, authors_t7_table(authors_sequential(seed=5), [0.5, 0.5, 0.5]))
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated|could not read"):
            glcic_fast.load(path)


@pytest.mark.parametrize("bn_after_relu", [False, True])
def test_our_format_is_lossless(tmp_path, bn_after_relu):
    net = randomize(CompletionNet(bn_after_relu, mean_pixel=[0.1, 0.2, 0.3]), seed=6)
    glcic_fast.save(net, tmp_path / "w.safetensors")
    back = glcic_fast.load(tmp_path / "w.safetensors")
    assert back.bn_after_relu == bn_after_relu and back.input_convention == net.input_convention
    assert torch.equal(back.mean_pixel, net.mean_pixel)
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    glcic_fast.save(CompletionNet(), path)
    before = path.read_bytes()

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        glcic_fast.save(randomize(CompletionNet(), seed=7), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"], "no temporary file is left behind"


def test_saved_weights_get_ordinary_file_permissions(tmp_path):
    """Not the private 0600 of the temporary file they are written through."""
    old = os.umask(0o027)
    try:
        glcic_fast.save(CompletionNet(), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640


def test_truncated_and_unknown_files(tmp_path):
    glcic_fast.save(CompletionNet(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        glcic_fast.load(tmp_path / "cut.safetensors")

    torch.save(ReferenceCompletionNet().state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="could not read"):
        glcic_fast.load(tmp_path / "cut.pth")

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="could not read"):
        glcic_fast.load(tmp_path / "notes.txt")
    with pytest.raises(WeightsError, match="no weights file"):
        glcic_fast.load(tmp_path / "missing.pth")


def test_wrong_keys_and_shapes():
    with pytest.raises(WeightsError, match="not a GLCIC completion network"):
        glcic_fast.load({"fc.weight": torch.zeros(2)})
    sd = ReferenceCompletionNet(True).state_dict()
    del sd["bn16.running_var"]
    with pytest.raises(WeightsError, match="missing"):
        glcic_fast.load(sd, config={"mpv": 0.5})
    sd = ReferenceCompletionNet(True).state_dict()
    sd["conv5.weight"] = torch.zeros(256, 256, 5, 5)
    with pytest.raises(WeightsError, match="conv5.weight has shape"):
        glcic_fast.load(sd, config={"mpv": 0.5})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Exploit()}, f)
    with pytest.raises(WeightsError, match="weights only"):
        glcic_fast.load(path)


def test_the_bundled_demo_checkpoint_loads_and_completes():
    from glcic_fast.inference.bench import DEMO_WEIGHTS

    if not os.path.exists(DEMO_WEIGHTS):
        pytest.skip(f"no demo checkpoint bundled at {DEMO_WEIGHTS}")
    net = glcic_fast.load(DEMO_WEIGHTS).eval()
    assert next(net.parameters()).dtype == torch.float32  # stored in float16, loaded as float32
    image = torch.rand(3, 40, 48)
    mask = torch.zeros(1, 40, 48)
    mask[:, 10:26, 12:30] = 1
    out = net.complete(image, mask)
    assert torch.isfinite(out).all() and torch.equal(out[:, :10], image[:, :10])
