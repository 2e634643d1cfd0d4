"""mmagic's (formerly mmediting's) Global&Local checkpoints: written here the way mmagic
writes them, from a plain-torch mirror of its generator, they load through
``glcic_fast.load``, the CLI's ``--weights`` and ``CompletionNet.load_state_dict``, run
fused, and complete an image as mmagic's own pipeline does.

The mirror and the pipeline follow mmagic's code (open-mmlab/mmagic):

- mmagic/models/editors/global_local/gl_encoder.py, gl_dilation.py, gl_decoder.py,
  gl_encoder_decoder.py: GLEncoder (enc1..enc6), GLDilationNeck (dilation_convs.0..3),
  GLDecoder (dec1..dec7, dec3 and dec5 'Deconv' = nn.ConvTranspose2d, dec7 without norm
  and activation, then out_act='clip': torch.clamp(min=-1, max=1)); GLEncoderDecoder
  registers encoder, decoder, dilation_neck and runs encoder -> neck -> decoder.
- mmcv/cnn/bricks/conv_module.py and norm.py: ConvModule = conv, then the norm under the
  name 'bn' (BN and SyncBN, eps 1e-5), then ReLU 'activate'; bias='auto' drops the conv's
  bias where a norm follows.
- configs/_base_/models/base_gl.py (SyncBN everywhere, DataPreprocessor mean = std =
  [127.5], no channel conversion); mmagic/datasets/transforms/loading.py
  (LoadImageFromFile: channel_order 'bgr'); get_masked_image.py (GetMaskedImage:
  hole pixels = zero_value 127.5); mmagic/models/base_models/one_stage.py
  (forward_tensor: cat([masked_img, mask], dim=1), fake_img = fake_res * mask +
  masked_img * (1 - mask), then data_preprocessor.destruct: x * 127.5 + 127.5).
- the checkpoint: {'meta', 'state_dict' (generator.* and disc.*), 'optimizer'}, from
  mmcv's save_checkpoint; tools/publish_model.py drops 'optimizer' and saves in the
  legacy (non-zip) format.
"""

import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import glcic_fast
from glcic_fast import CompletionNet, WeightsError
from glcic_fast.cli import commands as cli
from glcic_fast.imageio import read_image
from glcic_fast.nn.completion_net import SIGNED_BGR_ZERO_HOLE
from glcic_fast.nn.reference import ReferenceCompletionNet

from photos import photo, rect_mask

H, W = 64, 96


# ------------------------------------------------------------------ mmagic's generator, mirrored

class ConvModule(nn.Module):
    """mmcv's ConvModule as the GL models build it: conv, then 'bn', then ReLU 'activate'."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, dilation=1, *, deconv=False, norm=True,
                 act=True, max_channels=None):
        super().__init__()
        conv = nn.ConvTranspose2d if deconv else nn.Conv2d
        self.conv = conv(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=not norm)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


class GLEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        cin = 4
        for i, (cout, k, s) in enumerate(zip((64, 128, 128, 256, 256, 256), (5, 3, 3, 3, 3, 3), (1, 2, 1, 2, 1, 1))):
            self.add_module(f"enc{i + 1}", ConvModule(cin, cout, k, stride=s, padding=(k - 1) // 2))
            cin = cout

    def forward(self, x):
        for i in range(6):
            x = getattr(self, f"enc{i + 1}")(x)
        return x


class GLDilationNeck(nn.Module):
    def __init__(self):
        super().__init__()
        self.dilation_convs = nn.Sequential(*[ConvModule(256, 256, 3, padding=2 ** (i + 1), dilation=2 ** (i + 1))
                                              for i in range(4)])

    def forward(self, x):
        return self.dilation_convs(x)


class GLDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec1 = ConvModule(256, 256, 3, padding=1)
        self.dec2 = ConvModule(256, 256, 3, padding=1)
        self.dec3 = ConvModule(256, 128, 4, stride=2, padding=1, deconv=True)
        self.dec4 = ConvModule(128, 128, 3, padding=1)
        self.dec5 = ConvModule(128, 64, 4, stride=2, padding=1, deconv=True)
        self.dec6 = ConvModule(64, 32, 3, padding=1)
        self.dec7 = ConvModule(32, 3, 3, padding=1, norm=False, act=False)

    def forward(self, x):
        for i in range(7):
            x = getattr(self, f"dec{i + 1}")(x)
        return torch.clamp(x, min=-1, max=1.0)  # out_act='clip'


class GLEncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = GLEncoder()
        self.decoder = GLDecoder()
        self.dilation_neck = GLDilationNeck()

    def forward(self, x):
        return self.decoder(self.dilation_neck(self.encoder(x)))


class MultiLayerDiscriminator(nn.Module):
    """Its key names (conv1.conv.weight, ..., fc.linear.weight); channels cut to 32 to keep
    the file small (the loader reads the generator only)."""

    def __init__(self, num_convs):
        super().__init__()
        cin = 3
        for i in range(num_convs):
            self.add_module(f"conv{i + 1}", ConvModule(cin, 32, 5, stride=2, padding=2))
            cin = 32
        self.fc = nn.Module()
        self.fc.linear = nn.Linear(32 * 4 * 4, 64)


class GLInpaintor(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = GLEncoderDecoder()
        self.disc = nn.Module()
        self.disc.global_disc = MultiLayerDiscriminator(6)
        self.disc.local_disc = MultiLayerDiscriminator(5)
        self.disc.fc = nn.Linear(128, 1)


def random_inpaintor(seed):
    """Random weights and BN statistics (fresh BNs are the identity and would hide mistakes);
    convs scaled so that the output is spread over [-1, 1] and beyond (clamped in part)."""
    g = torch.Generator().manual_seed(seed)
    model = GLInpaintor()
    with torch.no_grad():
        for module in model.generator.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = module.weight[0].numel() if isinstance(module, nn.Conv2d) else module.weight.shape[0] * 4
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                module.num_batches_tracked.fill_(500000)
    return model.eval()


def mmagic_checkpoint(model, *, optimizer=True):
    """mmcv's save_checkpoint dict: meta, the whole inpaintor's state dict, the optimizers."""
    checkpoint = {"meta": {"mmcv_version": "1.3.1", "time": "Fri Jun 19 12:00:00 2020", "iter": 500000,
                           "epoch": 1, "exp_name": "gl_places", "seed": None,
                           "config": "model = dict(type='GLInpaintor', ...)"},
                  "state_dict": model.state_dict()}
    if optimizer:
        optimizers = {"generator": torch.optim.Adam(model.generator.parameters(), lr=4e-4),
                      "disc": torch.optim.Adam(model.disc.parameters(), lr=4e-4)}
        for opt in optimizers.values():  # one step, so that Adam's state holds tensors
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            opt.step()
        checkpoint["optimizer"] = {name: opt.state_dict() for name, opt in optimizers.items()}
    return checkpoint


# ------------------------------------------------------------------ mmagic's pipeline

def mmagic_complete(model, image, mask):
    """mmagic's completion of ``image`` (3 x H x W, RGB, 8-bit values / 255) and ``mask``
    (1 x H x W, 1 = hole), as an RGB image in [0, 1]."""
    bgr = image.flip(0) * 255                                   # LoadImageFromFile: BGR, 0..255
    masked = bgr * (1.0 - mask) + 127.5 * mask                  # GetMaskedImage(zero_value=127.5)
    inputs = (masked - 127.5) / 127.5                           # DataPreprocessor(mean=[127.5], std=[127.5])
    masks = mask[None]
    with torch.no_grad():
        fake_res = model.generator(torch.cat([inputs[None], masks], dim=1))
    fake_img = fake_res * masks + inputs[None] * (1.0 - masks)  # OneStageInpaintor.forward_tensor
    return (fake_img[0] * 127.5 + 127.5).flip(0) / 255          # destruct, back to RGB in [0, 1]


@pytest.fixture(scope="module")
def model():
    return random_inpaintor(seed=7)


@pytest.fixture(scope="module")
def image_and_mask():
    image = (photo("astronaut", H, W) * 255).round() / 255      # an 8-bit photo, as mmagic reads it
    mask = rect_mask(H, W, (10, 14, 30, 36), (40, 70, 20, 20))
    return image, mask


@pytest.fixture(scope="module")
def published(model, tmp_path_factory):
    """As published: tools/publish_model.py's legacy format, optimizer dropped."""
    path = tmp_path_factory.mktemp("mmagic") / "gl_256x256_8x12_places_20200619-52a040a8.pth"
    torch.save(mmagic_checkpoint(model, optimizer=False), path, _use_new_zipfile_serialization=False)
    return path


# ------------------------------------------------------------------ tests

def test_the_mirror_spreads_its_output_over_the_clamp(model, image_and_mask):
    """The comparisons below mean something only if the holes get values inside (-1, 1)
    and clamped ones too."""
    image, mask = image_and_mask
    raw = model.generator.decoder.dec7  # the pre-clamp output
    outputs = []
    handle = raw.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        mmagic_complete(model, image, mask)
    finally:
        handle.remove()
    inside = (outputs[0].abs() < 1).float().mean().item()
    assert 0.3 < inside < 0.97, f"{inside:.0%} of the raw outputs inside (-1, 1)"


def test_published_checkpoint_completes_as_mmagic_does(model, published, image_and_mask):
    image, mask = image_and_mask
    net = glcic_fast.load(published)
    assert net.output_activation == "hardtanh" and net.input_convention == SIGNED_BGR_ZERO_HOLE
    assert not net.bn_after_relu and "mmagic Global&Local" in net.weights_source
    assert [layer.activation for layer in net.fused_layers(torch.float32, torch.device("cpu"))][-1] == "hardtanh"
    got = glcic_fast.complete(image, mask, weights=str(published), device="cpu")
    want = mmagic_complete(model, image, mask)
    hole = mask.bool().expand_as(image)
    assert (got[hole] - want[hole]).abs().max().item() <= 1e-5
    assert torch.equal(got[~hole], image[~hole])  # outside the holes: the input itself
    assert (got[~hole] - want[~hole]).abs().max().item() <= 1e-5  # mmagic's round trip through [-1, 1]


def test_the_fused_forward_is_mmagics_generator(model, published):
    """Drop-in: net(x) is what mmagic's generator returns for the same 4-channel input."""
    net = glcic_fast.load(published).eval()
    x = torch.cat([torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1,
                   torch.zeros(2, 1, 32, 48)], 1)
    x[:, 3, 8:20, 10:30] = 1
    x[:, :3, 8:20, 10:30] = 0
    with torch.inference_mode():
        got, want = net(x), model.generator(x)
    assert (got - want).abs().max().item() <= 1e-5
    assert got.min() >= -1 and got.max() <= 1


def test_training_checkpoint_with_optimizer_and_meta(model, tmp_path, image_and_mask):
    path = tmp_path / "iter_500000.pth"
    torch.save(mmagic_checkpoint(model, optimizer=True), path)  # zip format, as training writes it
    net = glcic_fast.load(path)
    image, mask = image_and_mask
    got = net.complete(image, mask)
    hole = mask.bool().expand_as(image)
    assert (got[hole] - mmagic_complete(model, image, mask)[hole]).abs().max().item() <= 1e-5


@pytest.fixture
def fake_mmengine(monkeypatch):
    """A module named like mmengine's, so that torch.save pickles a HistoryBuffer under
    mmengine's name (mmengine itself is not installed, and the loader never imports it)."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self, values):
            self._log_history = np.asarray(values, dtype=np.float64)
            self._count_history = np.ones(len(values), dtype=np.int64)
            self.max_length = 1000000

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name, types.ModuleType(name)))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return HistoryBuffer


def test_mmengine_checkpoint_reads_its_bookkeeping_as_placeholders(model, tmp_path, fake_mmengine, image_and_mask):
    """mmagic 1.x (mmengine) checkpoints keep log buffers and numpy values beside the weights,
    which the weights-only reader refuses by default: they are read as inert placeholders."""
    checkpoint = mmagic_checkpoint(model)
    checkpoint["meta"]["seed"] = np.int64(2022)
    checkpoint["meta"]["best_psnr"] = np.float64(23.152)
    checkpoint["message_hub"] = {"log_scalars": {"train/loss": fake_mmengine([0.5, 0.25])},
                                 "runtime_info": {"iter": 500000}, "resumed_keys": {"iter": True}}
    path = tmp_path / "iter_500000.pth"
    torch.save(checkpoint, path)
    with pytest.raises(Exception):  # what the placeholders are for
        torch.load(path, weights_only=True)
    del sys.modules["mmengine.logging.history_buffer"]  # the loader has nothing to import
    net = glcic_fast.load(path)
    image, mask = image_and_mask
    hole = mask.bool().expand_as(image)
    got = net.complete(image, mask)
    assert (got[hole] - mmagic_complete(model, image, mask)[hole]).abs().max().item() <= 1e-5


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


class _Unknown:
    pass


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [_Exploit, _Unknown], ids=["os.system", "unknown-class"])
def test_a_checkpoint_holding_something_unsafe_is_refused_by_name(model, tmp_path, monkeypatch, zip_format, payload):
    checkpoint = mmagic_checkpoint(model, optimizer=False)
    checkpoint["meta"]["hook"] = payload()
    path = tmp_path / "gl.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    name = "os.system" if payload is _Exploit else f"{__name__}._Unknown"
    with pytest.raises(WeightsError, match="could not read .* safely") as info:
        glcic_fast.load(path)
    assert name in str(info.value) or (payload is _Exploit and "posix.system" in str(info.value))
    assert not ran


def test_unsafe_values_in_the_weights_themselves_are_refused(model, tmp_path, fake_mmengine):
    """A placeholder stands in for bookkeeping only: one where a tensor belongs is an error."""
    checkpoint = mmagic_checkpoint(model, optimizer=False)
    checkpoint["state_dict"]["generator.encoder.enc1.conv.weight"] = fake_mmengine([1.0])
    path = tmp_path / "gl.pth"
    torch.save(checkpoint, path)
    with pytest.raises(WeightsError, match="conv1.weight is a _Unread, not a tensor"):
        glcic_fast.load(path)


def test_load_state_dict_takes_mmagics_layout(model):
    """Drop-in: CompletionNet() + load_state_dict of mmagic's state dict runs mmagic's graph:
    the authors' block order, the clamp, mmagic's input convention."""
    for state_dict in (model.state_dict(), model.generator.state_dict()):
        net = CompletionNet()
        net.load_state_dict(state_dict)
        assert not net.bn_after_relu and "mmagic" in net.block_order_reason
        assert net.output_activation == "hardtanh" and net.input_convention == SIGNED_BGR_ZERO_HOLE
        x = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
        net.eval()
        with torch.inference_mode():
            assert (net(x) - model.generator(x)).abs().max().item() <= 1e-5
        # in train mode the net is the reference graph: the same clamp
        reference = ReferenceCompletionNet(False, "hardtanh")
        reference.load_state_dict(net.state_dict())
        net.train(), reference.train()
        assert torch.equal(net(x), reference(x))


def test_layout_errors_are_clear(model):
    state_dict = model.state_dict()
    state_dict["generator.decoder.dec8.conv.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match="unexpected key 'decoder.dec8.conv.weight'"):
        glcic_fast.load(state_dict)
    state_dict = model.state_dict()
    del state_dict["generator.decoder.dec7.conv.bias"]  # the one conv mmagic gives a bias
    with pytest.raises(WeightsError, match="missing"):
        glcic_fast.load(state_dict)
    with pytest.raises(WeightsError, match=r"generator\.encoder\.enc1\.conv\.weight"):
        glcic_fast.load({"generator.stage1.encoder.enc1.conv.weight": torch.zeros(1)})  # DeepFill's


def test_a_chosen_convention_that_cannot_read_the_clamp_is_refused(model):
    net = CompletionNet(input_convention=glcic_fast.MEAN_FILLED_HOLE)
    with pytest.raises(WeightsError, match="output_activation='hardtanh'"):
        net.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="reads the network's output as"):
        CompletionNet(output_activation="hardtanh", input_convention=glcic_fast.MEAN_FILLED_HOLE)


def test_save_and_load_keep_the_conventions(model, published, tmp_path, image_and_mask):
    net = glcic_fast.load(published)
    glcic_fast.save(net, tmp_path / "gl.safetensors")
    again = glcic_fast.load(tmp_path / "gl.safetensors")
    assert again.output_activation == "hardtanh" and again.input_convention == SIGNED_BGR_ZERO_HOLE
    assert not again.bn_after_relu and "mmagic Global&Local" in again.weights_source
    image, mask = image_and_mask
    assert torch.equal(again.complete(image, mask), net.complete(image, mask))


def test_cli_weights(model, published, tmp_path, image_and_mask, capsys):
    import cv2

    image, mask = image_and_mask
    image_path, mask_path, out = tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "out.png"
    assert cv2.imwrite(str(image_path), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8))
    assert cv2.imwrite(str(mask_path), (mask[0].numpy() * 255).astype(np.uint8))
    rc = cli.main(["complete", str(image_path), "--mask", str(mask_path), "-o", str(out), "--weights",
                   str(published), "--no-postprocess", "--no-progress", "--device", "cpu"])
    assert rc == 0
    got = read_image(out)
    want = mmagic_complete(model, image, mask)
    assert (got - want).abs().max().item() <= 0.5 / 255 + 1e-5  # the same completion, in 8 bits

    checkpoint = mmagic_checkpoint(model, optimizer=False)
    checkpoint["meta"]["hook"] = _Exploit()
    torch.save(checkpoint, tmp_path / "evil.pth")
    capsys.readouterr()
    rc = cli.main(["complete", str(image_path), "--mask", str(mask_path), "-o", str(tmp_path / "evil.png"),
                   "--weights", str(tmp_path / "evil.pth"), "--no-progress", "--device", "cpu"])
    assert rc == 2 and not (tmp_path / "evil.png").exists()
    assert "could not read" in capsys.readouterr().err


def test_region_of_interest_and_tiles_give_the_whole_images_holes(published, image_and_mask):
    """The output mapping is pointwise: tiles still reproduce the whole image bit for bit
    (at this size the ROI crop is the whole image: tests/inference covers smaller crops)."""
    net = glcic_fast.load(published)
    image, mask = image_and_mask
    whole = net.complete(image, mask, roi=False)
    assert torch.equal(net.complete(image, mask, roi=True), whole)
    assert torch.equal(net.complete(image, mask, roi=False, tile=32), whole)
    assert len(net.explain_backends(torch.zeros(1, 4, H, W))) == 17
