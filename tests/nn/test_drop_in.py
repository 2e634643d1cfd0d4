"""The drop-in contract: a user swaps their class for glcic_fast's, keeps their own
``net.load_state_dict(torch.load(ckpt))`` line, and gets their own network's outputs.

The oracles are the peers' own graphs, written here as plain PyTorch modules the way each
peer writes them: GLCIC-PyTorch's ``CompletionNetwork`` (modules conv1..conv17, bn1..bn16,
act1..act17; ``bn(act(conv(x)))``) and the authors' model converted to PyTorch (an
nn.Sequential of 50 modules: conv, BN, ReLU per layer, then conv and Sigmoid). Weights and
BN statistics are random, with running means drawn as each order can learn them (after a
ReLU a BN only sees values >= 0).
"""

import pytest
import torch
from torch import nn

import glcic_fast
from glcic_fast import CompletionNet, CompletionNetwork, WeightsError
from glcic_fast.nn.architecture import COMPLETION_LAYERS


def _conv(spec):
    cls = nn.ConvTranspose2d if spec.transposed else nn.Conv2d
    return cls(spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
               padding=spec.padding, dilation=spec.dilation)


class GlcicPytorchCompletionNetwork(nn.Module):
    """GLCIC-PyTorch's CompletionNetwork: conv -> ReLU -> BN."""

    def __init__(self):
        super().__init__()
        for spec in COMPLETION_LAYERS:
            setattr(self, spec.name, _conv(spec))
            if spec.has_bn:
                setattr(self, f"bn{spec.index}", nn.BatchNorm2d(spec.out_channels))
                setattr(self, f"act{spec.index}", nn.ReLU())
            else:
                setattr(self, f"act{spec.index}", nn.Sigmoid())

    def forward(self, x):
        for spec in COMPLETION_LAYERS:
            x = getattr(self, f"act{spec.index}")(getattr(self, spec.name)(x))
            if spec.has_bn:
                x = getattr(self, f"bn{spec.index}")(x)
        return x


def authors_sequential() -> nn.Sequential:
    """The authors' Torch7 model as an nn.Sequential: conv -> BN -> ReLU."""
    modules = []
    for spec in COMPLETION_LAYERS:
        modules.append(_conv(spec))
        modules += [nn.BatchNorm2d(spec.out_channels), nn.ReLU()] if spec.has_bn else [nn.Sigmoid()]
    return nn.Sequential(*modules)


def randomize_peer(model: nn.Module, bn_after_relu: bool, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                mean = torch.randn(n, generator=g) * 0.2
                m.running_mean.copy_(mean.abs() if bn_after_relu else mean)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return model


def _input(seed=1, n=2, h=32, w=40):
    return torch.rand(n, 4, h, w, generator=torch.Generator().manual_seed(seed)) - 0.5


def _assert_same_as_peer(net, peer, train: bool):
    """Outputs (eval: folded fast path; train: batch statistics), input gradients and the
    BN running statistics after the step are the peer's."""
    x = _input()
    net.train(train), peer.train(train)
    if not train:
        with torch.inference_mode():
            assert (net(x) - peer(x)).abs().max().item() <= 1e-5
        return
    x_net, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = net(x_net), peer(x_peer)
    assert (got - want).abs().max().item() <= 1e-5
    got.square().sum().backward()
    want.square().sum().backward()
    assert (x_net.grad - x_peer.grad).abs().max().item() <= 1e-4
    peer_bns = [m for m in peer.modules() if isinstance(m, nn.BatchNorm2d)]
    for spec, peer_bn in zip([s for s in COMPLETION_LAYERS if s.has_bn], peer_bns):
        assert torch.allclose(getattr(net, f"bn{spec.index}").running_mean, peer_bn.running_mean, atol=1e-6)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "dataparallel"])
@pytest.mark.parametrize("cls", [CompletionNet, CompletionNetwork], ids=["CompletionNet", "CompletionNetwork"])
def test_glcic_pytorch_state_dict_runs_glcic_pytorch_graph(tmp_path, cls, prefix, train):
    peer = randomize_peer(GlcicPytorchCompletionNetwork(), bn_after_relu=True, seed=0)
    torch.save({prefix + k: v for k, v in peer.state_dict().items()}, tmp_path / "model_cn")

    net = cls()
    net.load_state_dict(torch.load(tmp_path / "model_cn"))  # the user's own line
    assert net.bn_after_relu and "GLCIC-PyTorch" in repr(net)
    _assert_same_as_peer(net, peer, train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_authors_sequential_state_dict_runs_authors_graph(tmp_path, train):
    peer = randomize_peer(authors_sequential(), bn_after_relu=False, seed=1)
    torch.save(peer.state_dict(), tmp_path / "authors.pth")

    net = CompletionNet()
    net.load_state_dict(torch.load(tmp_path / "authors.pth"))
    assert not net.bn_after_relu
    assert "conv -> BN -> ReLU" in repr(net) and "nn.Sequential keys" in repr(net)
    assert net.input_convention == glcic_fast.MEAN_SUBTRACTED_ZERO_HOLE  # the authors' convention follows
    _assert_same_as_peer(net, peer, train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_authors_weights_under_glcic_pytorch_names_run_authors_graph(train):
    """The authors' weights renamed to this package's (GLCIC-PyTorch's) keys, e.g. a
    CompletionNet(bn_after_relu=False) state dict: the negative BN running means prove
    conv -> BN -> ReLU."""
    peer = randomize_peer(authors_sequential(), bn_after_relu=False, seed=2)
    source = CompletionNet(bn_after_relu=False)
    source.load_state_dict(peer.state_dict())

    net = CompletionNet()
    net.load_state_dict(source.state_dict())
    assert not net.bn_after_relu and "negative values" in repr(net)
    _assert_same_as_peer(net, peer, train)


def test_the_old_default_would_have_run_the_wrong_graph():
    """What the contract fixes: GLCIC-PyTorch weights in the authors' order differ from
    GLCIC-PyTorch's own outputs (by ~1e-2), so the order matters and is tested above."""
    peer = randomize_peer(GlcicPytorchCompletionNetwork(), bn_after_relu=True, seed=3).eval()
    wrong = CompletionNet(bn_after_relu=False).eval()
    wrong.load_state_dict(peer.state_dict())  # nothing proves GLCIC-PyTorch's order: taken as asked
    x = _input()
    with torch.inference_mode():
        assert (wrong(x) - peer(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("make_state_dict", ["sequential", "negative_means"])
def test_an_explicit_order_refuses_weights_that_prove_the_other(make_state_dict):
    peer = randomize_peer(authors_sequential(), bn_after_relu=False, seed=4)
    state_dict = peer.state_dict()
    if make_state_dict == "negative_means":
        source = CompletionNet(bn_after_relu=False)
        source.load_state_dict(state_dict)
        state_dict = source.state_dict()
    net = CompletionNet(bn_after_relu=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError, match=r"built with bn_after_relu=True .* conv -> BN -> ReLU"):
        net.load_state_dict(state_dict)
    assert net.bn_after_relu and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_an_explicit_order_is_kept_where_the_weights_cannot_tell():
    peer = randomize_peer(GlcicPytorchCompletionNetwork(), bn_after_relu=True, seed=5)
    net = CompletionNet(bn_after_relu=False)
    net.load_state_dict(peer.state_dict())
    assert not net.bn_after_relu and "chosen" in repr(net)


def test_a_net_follows_each_state_dict_it_is_given():
    """An unset order is decided by each load: authors' weights, then GLCIC-PyTorch's."""
    net = CompletionNet()
    net.load_state_dict(randomize_peer(authors_sequential(), False, seed=6).state_dict())
    assert not net.bn_after_relu
    peer = randomize_peer(GlcicPytorchCompletionNetwork(), True, seed=7)
    net.load_state_dict(peer.state_dict())
    assert net.bn_after_relu
    _assert_same_as_peer(net, peer, train=False)


def test_glcic_fast_load_infers_the_authors_order_from_the_statistics(tmp_path):
    peer = randomize_peer(authors_sequential(), bn_after_relu=False, seed=8).eval()
    source = CompletionNet(bn_after_relu=False)
    source.load_state_dict(peer.state_dict())
    torch.save(source.state_dict(), tmp_path / "authors_renamed.pth")
    net = glcic_fast.load(tmp_path / "authors_renamed.pth").eval()
    assert not net.bn_after_relu
    x = _input()
    with torch.inference_mode():
        assert (net(x) - peer(x)).abs().max().item() <= 1e-5


def test_glcic_fast_load_refuses_our_file_whose_statistics_contradict_its_metadata(tmp_path):
    source = CompletionNet(bn_after_relu=False)
    source.load_state_dict(randomize_peer(authors_sequential(), False, seed=9).state_dict())
    source.bn_after_relu = True  # a file whose metadata says conv -> ReLU -> BN
    glcic_fast.save(source, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="negative values"):
        glcic_fast.load(tmp_path / "w.safetensors")


class _Inpainter(nn.Module):
    """A user's own module holding the net, as training scripts and wrappers do."""

    def __init__(self):
        super().__init__()
        self.generator = CompletionNet()


@pytest.mark.parametrize("how", ["parent module", "nn.Module.load_state_dict", "DataParallel prefix"])
def test_the_contract_holds_however_the_weights_arrive(how):
    """A parent's load_state_dict, or nn.Module's called directly, never passes through
    CompletionNet.load_state_dict: the block order must still follow the weights."""
    peer = randomize_peer(authors_sequential(), bn_after_relu=False, seed=10)
    source = CompletionNet(bn_after_relu=False)
    source.load_state_dict(peer.state_dict())
    if how == "parent module":
        holder = _Inpainter()
        holder.load_state_dict({"generator." + k: v for k, v in source.state_dict().items()})
        net = holder.generator
    elif how == "nn.Module.load_state_dict":
        net = CompletionNet()
        nn.Module.load_state_dict(net, source.state_dict())
    else:
        net = CompletionNet()
        net.load_state_dict({"module." + k: v for k, v in source.state_dict().items()})
    assert not net.bn_after_relu
    _assert_same_as_peer(net, peer, train=False)


def test_the_authors_sequential_keys_load_under_a_parent_module():
    peer = randomize_peer(authors_sequential(), bn_after_relu=False, seed=11)
    holder = _Inpainter()
    holder.load_state_dict({"generator." + k: v for k, v in peer.state_dict().items()})
    assert not holder.generator.bn_after_relu
    _assert_same_as_peer(holder.generator, peer, train=False)


def test_glcic_fast_load_says_where_it_took_the_order_from(tmp_path):
    source = CompletionNet(bn_after_relu=False)
    source.load_state_dict(randomize_peer(authors_sequential(), False, seed=12).state_dict())
    torch.save(source.state_dict(), tmp_path / "renamed.pth")
    net = glcic_fast.load(tmp_path / "renamed.pth")
    assert "GLCIC-PyTorch's keys, the authors' block order (from the BN statistics)" in net.weights_source


def test_the_reference_module_keeps_its_old_import_path():
    import glcic_fast.reference
    from glcic_fast.reference import ReferenceCompletionNet

    assert glcic_fast.reference is glcic_fast.nn.reference
    assert ReferenceCompletionNet().bn_after_relu is False  # the oracle's default order is unchanged
