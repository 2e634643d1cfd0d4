"""glcic_fast.export_onnx: the ONNX file in ONNX Runtime (CPU provider) and OpenVINO (CPU)
against glcic_fast's eval net, for both block orders and mmagic's clamped net, random
weights and BN statistics, on real photos at three sizes (none the size the exporter
traced); its metadata read back and used as a consumer would; the fixed-shape file; the
refusals."""

import functools
import json
import sys

import numpy as np
import pytest
import torch

import glcic_fast
from glcic_fast.inference.export import CONVENTION_FORMULAS, INPUT_NAME, ONNX_ACTIVATIONS, FoldedNet, export_onnx
from glcic_fast.nn.architecture import OUTPUT_ACTIVATIONS
from glcic_fast.nn.completion_net import CompletionNet

from helpers import randomize, saved_random_net
from photos import photo, rect_mask

ort = pytest.importorskip("onnxruntime", reason="the parity tests need onnxruntime (the test extra installs it)")
ov = pytest.importorskip("openvino", reason="the parity tests need openvino (the test extra installs it)")
pytest.importorskip("onnxscript", reason="exporting needs onnxscript (the export extra installs it)")

#: The nets exported: GLCIC-PyTorch's block order (BN's affine after the ReLU: Mul, Add in
#: the file), the authors' (BN folded into the conv), mmagic's (the authors' order with the
#: output clamp and its BGR, [-1, 1] convention).
NETS = {"conv-relu-bn": {"bn_after_relu": True}, "conv-bn-relu": {"bn_after_relu": False},
        "mmagic-clamp": {"bn_after_relu": False, "output_activation": "hardtanh"}}
#: (photos, H, W): none is the 64 x 64 the dynamic export traces; one non-square, one batch of 2.
SIZES = {"48x48": (("astronaut",), 48, 48), "2x96x128": (("chelsea", "coffee"), 96, 128),
         "132x68": (("rocket",), 132, 68)}
FP32_TOLERANCE = 1e-5


@functools.lru_cache(maxsize=None)
def _onnxruntime_session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def _openvino_model(path):
    # f32 explicitly: on CPUs with bf16 or fp16 arithmetic OpenVINO would otherwise lower it.
    return ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


ENGINES = {
    "onnxruntime": lambda path, x: _onnxruntime_session(str(path)).run(None, {INPUT_NAME: x})[0],
    "openvino": lambda path, x: _openvino_model(str(path))(x)[0],
}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Each of NETS with random weights and BN statistics and a mean pixel of its own,
    saved and loaded back (so its weights' source is a file)."""
    loaded = {}
    for seed, (name, kwargs) in enumerate(NETS.items()):
        _, path = saved_random_net(tmp_path_factory.mktemp("weights"), seed=7 + seed, mean_pixel=(0.3, 0.5, 0.7),
                                   **kwargs)
        loaded[name] = glcic_fast.load(path).eval()
    return loaded


@pytest.fixture(scope="module")
def exported(nets, tmp_path_factory):
    """exported(name, dtype=torch.float32): the path of the net's dynamic-shape file, written once."""
    paths = {}

    def get(name, dtype=torch.float32):
        if (name, dtype) not in paths:
            path = tmp_path_factory.mktemp("onnx") / f"{name}-{str(dtype)[6:]}.onnx"
            export_onnx(nets[name], path, dtype=dtype)
            paths[name, dtype] = path
        return paths[name, dtype]

    return get


def _photo_input(net, size):
    names, h, w = SIZES[size]
    image = torch.stack([photo(name, h, w) for name in names])
    mask = torch.stack([rect_mask(h, w, (h // 4, w // 3, h // 2, w // 3)) for _ in names])
    return image, mask


def _eval_output(net, x):
    with torch.inference_mode():
        return net(x).numpy()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", NETS)
def test_fp32_file_matches_eval_net(nets, exported, name, engine, size):
    net = nets[name]
    x = net.prepare_input(*_photo_input(net, size))
    want = _eval_output(net, x)
    got = ENGINES[engine](exported(name), x.numpy())
    assert got.shape == want.shape and got.dtype == np.float32
    diff = np.abs(got - want).max()
    assert diff <= FP32_TOLERANCE, f"{engine}, {name}, {size}: max |diff| {diff:.2e} to the eval net"


def test_clamp_bites(nets, exported):
    """mmagic's net: the file holds Clip, and on these weights the clamp takes effect at both
    ends (so the parity above covers it)."""
    import onnx

    assert "Clip" in {node.op_type for node in onnx.load(str(exported("mmagic-clamp"))).graph.node}
    net = nets["mmagic-clamp"]
    want = _eval_output(net, net.prepare_input(*_photo_input(net, "132x68")))
    assert want.min() == -1 and want.max() == 1


@pytest.mark.parametrize("name", NETS)
def test_folded_net_is_the_eval_net(nets, name):
    """FoldedNet, the graph the file holds (and the fp16 test's emulation runs), in PyTorch."""
    net = nets[name]
    x = net.prepare_input(*_photo_input(net, "132x68"))
    with torch.inference_mode():
        got = FoldedNet(net).eval()(x).numpy()
    assert np.abs(got - _eval_output(net, x)).max() <= FP32_TOLERANCE


def _fp16_storage_output(net, x):
    """What fp16 storage alone costs: the folded graph with weights, input and every
    layer's output rounded to fp16, the arithmetic in fp32 (as these engines run an fp16
    file on a CPU without fp16 arithmetic)."""
    graph = FoldedNet(net, torch.float16).float().eval()
    for layer in graph.layers.values():
        layer.register_forward_hook(lambda module, args, out: out.half().float())
    with torch.inference_mode():
        return graph(x.half().float()).numpy()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", NETS)
def test_fp16_file_within_fp16_rounding(nets, exported, name, engine):
    """The fp16 file's error to the fp32 eval net is that of storing weights and
    activations in fp16, give or take the output's last fp16 bit (2^-11 near 1): the
    engines run the same graph, only in another order of summation."""
    net, path = nets[name], exported(name, torch.float16)
    for size in SIZES:
        x = net.prepare_input(*_photo_input(net, size))
        want = _eval_output(net, x)
        got = ENGINES[engine](path, x.numpy().astype(np.float16))
        assert got.dtype == np.float16 and got.shape == want.shape
        error = np.abs(got.astype(np.float32) - want).max()
        storage_error = np.abs(_fp16_storage_output(net, x) - want).max()
        assert error <= storage_error + 2 ** -11, (
            f"{engine}, {name}, {size}: fp16 file's max |diff| {error:.2e}, fp16 storage alone {storage_error:.2e}")


@pytest.mark.parametrize("name", NETS)
def test_metadata_builds_the_input_without_glcic_fast(nets, exported, name):
    """What a consumer reads (ONNX Runtime's and OpenVINO's view of the metadata) states the
    net: its input formula evaluated with numpy is prepare_input, its output formula
    output_to_image, and the block order, mean pixel and weights' source are the net's."""
    net, path = nets[name], str(exported(name))
    meta = _onnxruntime_session(path).get_modelmeta().custom_metadata_map
    model = ov.Core().read_model(path)
    assert {key: model.get_rt_info(["framework", key]).astype(str) for key in meta} == meta
    assert meta["input_convention"] == net.input_convention
    order = "conv -> ReLU -> BN" if NETS[name]["bn_after_relu"] else "conv -> BN -> ReLU"
    assert meta["block_order"].startswith(order)
    assert meta["weights_source"] == net.weights_source and net.weights_source.startswith("glcic_fast (")
    mean_pixel = json.loads(meta["mean_pixel"])
    if net.input_convention == glcic_fast.SIGNED_BGR_ZERO_HOLE:
        assert mean_pixel is None and "mean_pixel" not in meta["input_formula"]  # fixed normalisation
    else:
        assert mean_pixel == pytest.approx([0.3, 0.5, 0.7])
    assert (meta["dtype"], meta["shape"], meta["size_multiple"], meta["output_activation"]) == \
        ("float32", "dynamic", "4", net.output_activation)

    image, mask = _photo_input(net, "132x68")
    names = {"image": image.numpy(), "mask": mask.numpy(),
             "mean_pixel": None if mean_pixel is None else np.array(mean_pixel, np.float32).reshape(1, 3, 1, 1)}
    colour = eval(meta["input_formula"], {}, names)
    x = np.concatenate([colour, names["mask"]], axis=1)
    np.testing.assert_allclose(x, net.prepare_input(image, mask).numpy(), atol=1e-7, rtol=0)
    output = ENGINES["onnxruntime"](path, x)
    np.testing.assert_allclose(eval(meta["output_formula"], {}, {"output": output}),
                               net.output_to_image(torch.from_numpy(output)).numpy(), atol=1e-7, rtol=0)


def test_every_activation_is_exportable():
    assert {"relu", *OUTPUT_ACTIVATIONS} <= set(ONNX_ACTIVATIONS)


def test_every_input_convention_has_formulas():
    from glcic_fast.nn.completion_net import INPUT_CONVENTIONS

    assert set(CONVENTION_FORMULAS) == set(INPUT_CONVENTIONS)


def test_file_holds_standard_operators_only(exported):
    import onnx

    model = onnx.load(str(exported("conv-relu-bn")))
    ops = {node.op_type for node in model.graph.node}
    assert ops == {"Conv", "ConvTranspose", "Relu", "Sigmoid", "Mul", "Add"}
    assert {node.domain for node in model.graph.node} == {""} and not model.functions
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (model.graph.input[0], model.graph.output[0])]
    assert dims == [["batch", 4, "4*height_div_4", "4*width_div_4"], ["batch", 3, "4*height_div_4", "4*width_div_4"]]


def test_fixed_shape_file(nets, tmp_path):
    net, path = nets["conv-bn-relu"], tmp_path / "fixed.onnx"
    metadata = export_onnx(net, path, dynamic=False, shape=(2, 96, 128))
    assert metadata["shape"] == "2x4x96x128"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 4, 96, 128]
    x = net.prepare_input(*_photo_input(net, "2x96x128"))
    assert np.abs(session.run(None, {INPUT_NAME: x.numpy()})[0] - _eval_output(net, x)).max() <= FP32_TOLERANCE
    other = net.prepare_input(*_photo_input(net, "132x68")).numpy()
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="invalid dimensions"):
        session.run(None, {INPUT_NAME: other})
    # OpenVINO compiles a fixed-shape file for that shape and refuses another too.
    compiled = ov.Core().compile_model(str(path), "CPU")
    with pytest.raises(RuntimeError):
        compiled(other)


def test_refusals_keep_an_existing_file(nets, tmp_path, monkeypatch):
    net, path = nets["conv-relu-bn"], tmp_path / "model.onnx"
    path.write_bytes(b"the previous file")
    with pytest.raises(ValueError, match="float32 or float16"):
        export_onnx(net, path, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dynamic=False"):
        export_onnx(net, path, shape=(1, 64, 64))
    with pytest.raises(ValueError, match="needs shape"):
        export_onnx(net, path, dynamic=False)
    with pytest.raises(ValueError, match="multiples of 4"):
        export_onnx(net, path, dynamic=False, shape=(1, 62, 64))
    with pytest.raises(TypeError, match="CompletionNet"):
        export_onnx(glcic_fast.reference.ReferenceCompletionNet(), path)
    monkeypatch.setattr(net, "fused_layers", lambda dtype, device: [
        layer._replace(activation="gelu") if layer.spec.name == "conv17" else layer
        for layer in CompletionNet.fused_layers(net, dtype, device)])
    with pytest.raises(ValueError, match="conv17: no ONNX export for the activation 'gelu'"):
        export_onnx(net, path)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"glcic_fast\[export\]"):
        export_onnx(net, path)
    assert path.read_bytes() == b"the previous file"


def test_fp16_refuses_weights_it_cannot_hold(tmp_path):
    net = randomize(CompletionNet(bn_after_relu=False), seed=1).eval()
    with torch.no_grad():
        net.bn3.weight[5] = 1e6  # folded into conv3: weights past fp16's 65504
    with pytest.raises(ValueError, match="does not fit in torch.float16"):
        export_onnx(net, tmp_path / "model.onnx", dtype=torch.float16)
    assert not (tmp_path / "model.onnx").exists()
