"""CompletionNet vs the reference: eval-mode fused parity, train-mode identity, caching."""

import pytest
import torch
import torch.nn.functional as F

import glcic_fast
from glcic_fast import CompletionNet
from glcic_fast.nn.completion_net import SIGNED_BGR_ZERO_HOLE
from glcic_fast.nn.reference import ReferenceCompletionNet

from helpers import call_targets, compile_recording_graphs, random_image_and_mask, randomize

ORDERS = [False, True]
#: (bn_after_relu, output activation) of the nets users hold: GLCIC-PyTorch's, the authors',
#: mmagic's.
KINDS = {"glcic-pytorch": (True, "sigmoid"), "authors": (False, "sigmoid"), "mmagic": (False, "hardtanh")}


def pair(bn_after_relu, seed=0, output_activation="sigmoid"):
    net = randomize(CompletionNet(bn_after_relu, output_activation=output_activation), seed)
    ref = ReferenceCompletionNet(bn_after_relu, output_activation)
    ref.load_state_dict(net.state_dict())
    return net, ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 48, 64), (1, 100, 36)])
def test_eval_fused_matches_reference(kind, shape):
    bn_after_relu, output_activation = KINDS[kind]
    net, ref = pair(bn_after_relu, output_activation=output_activation)
    net.eval(), ref.eval()
    n, h, w = shape
    x = torch.rand(n, 4, h, w, generator=torch.Generator().manual_seed(1)) - 0.5
    with torch.inference_mode():
        got, want = net(x), ref(x)
    assert got.shape == want.shape == (n, 3, h, w)
    assert (got - want).abs().max().item() <= 1e-4
    # BN folds into the conv only for conv -> BN -> ReLU; otherwise it is the post affine.
    assert all((layer.post_scale is not None) == (bn_after_relu and layer.spec.has_bn)
               for layer in net.fused_layers(x.dtype, x.device))


@pytest.mark.parametrize("output_activation", ["sigmoid", "hardtanh"])
def test_fused_layers_carry_each_layers_activation(output_activation):
    """Readers of fused_layers (exporters) take the epilogue from the layer itself."""
    layers = CompletionNet(output_activation=output_activation).fused_layers(torch.float32, torch.device("cpu"))
    assert [layer.activation for layer in layers] == ["relu"] * 16 + [output_activation]


def test_output_activation_choices_and_conventions():
    net = CompletionNet(input_convention=SIGNED_BGR_ZERO_HOLE)  # the convention implies the clamp
    assert net.output_activation == "hardtanh" and "output activation: hardtanh" in repr(net)
    assert CompletionNet(output_activation="hardtanh").input_convention == SIGNED_BGR_ZERO_HOLE
    assert CompletionNet().output_activation == "sigmoid"
    with pytest.raises(ValueError, match="output_activation must be one of"):
        CompletionNet(output_activation="tanh")
    with pytest.raises(ValueError, match=r"reads the network's output as \(0, 1\)"):
        CompletionNet(True, output_activation="hardtanh").input_convention = glcic_fast.MEAN_FILLED_HOLE


def test_output_to_image():
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(CompletionNet().output_to_image(y), y)  # the sigmoid's output is the image
    mapped = CompletionNet(output_activation="hardtanh").output_to_image(y)
    assert torch.equal(mapped, (y * 0.5 + 0.5)[:, [2, 1, 0]])  # BGR in [-1, 1] -> RGB in [0, 1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hw", [(37, 50), (64, 41)])
def test_complete_any_size_matches_reference(kind, hw):
    """complete() pads non-multiples of 4 by replication, applies the net's convention,
    and replaces only hole pixels; the reference is applied by hand here."""
    bn_after_relu, output_activation = KINDS[kind]
    net, ref = pair(bn_after_relu, seed=3, output_activation=output_activation)
    ref.eval()
    h, w = hw
    image, mask = random_image_and_mask(2, h, w, seed=2)
    got = net.complete(image, mask)

    mean = net.mean_pixel.view(1, 3, 1, 1)
    if kind == "glcic-pytorch":  # hole filled with the mean pixel
        colour = image * (1 - mask) + mean * mask
    elif kind == "authors":  # mean subtracted, hole zeroed
        colour = (image - mean) * (1 - mask)
    else:  # mmagic: BGR, (x - 127.5) / 127.5 in 8-bit units, hole zeroed
        colour = (image[:, [2, 1, 0]] - 0.5) / 0.5 * (1 - mask)
    x = F.pad(torch.cat([colour, mask], 1), (0, -w % 4, 0, -h % 4), mode="replicate")
    with torch.no_grad():
        out = ref(x)[..., :h, :w]
    if kind == "mmagic":  # BGR in [-1, 1] back to RGB in [0, 1]
        out = (out * 0.5 + 0.5)[:, [2, 1, 0]]
    want = image * (1 - mask) + out * mask
    assert got.shape == image.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got[mask.expand_as(got) == 0], image[mask.expand_as(image) == 0])
    assert net.training, "complete() restores the training flag"


@pytest.mark.parametrize("kind", KINDS)
def test_train_mode_is_the_reference(kind):
    bn_after_relu, output_activation = KINDS[kind]
    net, ref = pair(bn_after_relu, seed=5, output_activation=output_activation)
    net.train(), ref.train()
    x = torch.rand(2, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    x_net, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_net, out_ref = net(x_net), ref(x_ref)
    assert torch.equal(out_net, out_ref)
    g = torch.rand_like(out_net)
    out_net.backward(g)
    out_ref.backward(g)
    assert torch.equal(x_net.grad, x_ref.grad)
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), (_, c) in zip(net.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, c), name  # BN running statistics updated identically


@pytest.mark.parametrize("bn_after_relu", ORDERS)
def test_eval_mode_gradients_reach_parameters(bn_after_relu):
    """With autograd recording, eval mode folds inside the graph: parameter gradients
    equal the reference's. In float64, so that the comparison is exact to rounding
    (in fp32 the deep chain amplifies the reordered rounding of the folded weights)."""
    net, ref = pair(bn_after_relu, seed=6)
    net.double().eval(), ref.double().eval()
    x = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    net(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        assert (p.grad - q.grad).norm() <= 1e-10 * q.grad.norm(), name


def test_fold_cache_follows_parameter_changes():
    net, ref = pair(False, seed=8)
    net.eval(), ref.eval()
    x = torch.rand(1, 4, 32, 32)
    with torch.inference_mode():
        first = net(x)
    other = randomize(ReferenceCompletionNet(False), seed=9)
    net.load_state_dict(other.state_dict())
    other.eval()
    with torch.inference_mode():
        assert (net(x) - other(x)).abs().max() <= 1e-4
        assert not torch.allclose(net(x), first)
    with torch.no_grad():
        net.bn3.running_var.mul_(2)  # in-place change: the version counter moves
        other.bn3.running_var.mul_(2)
    with torch.inference_mode():
        assert (net(x) - other(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["authors", "glcic-pytorch"])
def test_torch_compile_takes_the_whole_net_as_one_graph(kind):
    """torch.compile(net) in eval mode: one graph (no break, no recompilation per layer or
    per call), holding the dispatcher's custom ops, with the eager net's output, also after
    a weight changes in place."""
    bn_after_relu, output_activation = KINDS[kind]
    net, _ = pair(bn_after_relu, seed=14, output_activation=output_activation)
    net.eval()
    x = torch.rand(2, 4, 32, 48)
    compiled_net, graphs = compile_recording_graphs(net)
    with torch.no_grad():
        torch.testing.assert_close(compiled_net(x), net(x), rtol=0, atol=1e-5)
        net.conv6.weight.mul_(-1)
        net.bn6.running_var.mul_(3)
        torch.testing.assert_close(compiled_net(x), net(x), rtol=0, atol=1e-5)
    assert len(graphs) == 1
    targets = call_targets(graphs[0].graph)
    # Dynamo's graph names the functions called: torch's conv2d and conv_transpose2d (the
    # "torch" backend), the custom op for the others.
    expected_calls = {"cpp": "glcic_fast.conv3x3_winograd_bias_act", "torch": "method conv"}
    for chosen in {chosen for chosen, _ in net.layer_backends(x).values()}:
        assert any(expected_calls[chosen] in t for t in targets), (chosen, targets)


def test_low_precision_input_runs_in_that_dtype():
    net, ref = pair(False, seed=10)
    net.eval(), ref.eval()
    x = torch.rand(1, 4, 32, 32)
    with torch.inference_mode():
        got = net(x.bfloat16())
        want = ref(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.05


def test_network_input_errors():
    net = CompletionNet().eval()
    with pytest.raises(ValueError, match="N x 4 x H x W"):
        net(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 4, 30, 32))
    with pytest.raises(TypeError, match="floating point"):
        net(torch.zeros(1, 4, 32, 32, dtype=torch.uint8))


def test_repr_says_what_it_holds():
    text = repr(CompletionNet(True))
    assert "conv -> ReLU -> BN (GLCIC-PyTorch)" in text and "mean_filled_hole" in text


def test_net_built_under_inference_mode():
    """Parameters that are inference tensors have no version counter: the fold is reused
    while their contents are unchanged, and redone after an in-place change or a load."""
    with torch.inference_mode():
        net = randomize(CompletionNet(bn_after_relu=False), seed=12).eval()  # folding is the point
        ref = ReferenceCompletionNet(bn_after_relu=False)
        ref.load_state_dict(net.state_dict())
        ref.eval()
        x = torch.rand(1, 4, 16, 16)
        assert (net(x) - ref(x)).abs().max() <= 1e-4
        folded = net.fused_layers(x.dtype, x.device)
        assert net.fused_layers(x.dtype, x.device) is folded, "unchanged inference tensors were folded again"
        assert not folded[0].weight.is_inference(), "the backends' packed-weight caches need version counters"

        net.bn3.running_var.mul_(2)  # in place, and no version counter moves
        ref.bn3.running_var.mul_(2)
        assert net.fused_layers(x.dtype, x.device) is not folded
        assert (net(x) - ref(x)).abs().max() <= 1e-4

        other = randomize(ReferenceCompletionNet(False), seed=13).eval()
        net.load_state_dict(other.state_dict())  # copies into the same storage
        assert (net(x) - other(x)).abs().max() <= 1e-4

        # Compared bit for bit: a NaN is unchanged when it stays, 0.0 -> -0.0 is a change.
        net.bn1.running_mean[0] = float("nan")
        folded = net.fused_layers(x.dtype, x.device)
        assert net.fused_layers(x.dtype, x.device) is folded
        net.conv1.bias[0] = 0.0
        folded = net.fused_layers(x.dtype, x.device)
        net.conv1.bias[0] = -0.0
        assert net.fused_layers(x.dtype, x.device) is not folded
