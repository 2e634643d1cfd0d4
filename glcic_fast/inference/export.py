"""The completion network as an ONNX file, for the engines deployers already run (ONNX
Runtime, TensorRT, OpenVINO, Triton Inference Server).

The file holds the eval graph with BatchNorm folded (``CompletionNet.fused_layers``), in
standard ONNX operators only: per layer a Conv or ConvTranspose, the activation (Relu,
Sigmoid, or Clip for mmagic's clamp) and, where the block is conv -> ReLU -> BN, BN's
per-channel affine after it (Mul, Add). None of glcic_fast's own ops appear in it, so any
ONNX engine runs it as it ships.
Its metadata says how to build the input (the input convention as a formula, the mean
pixel), the block order and where the weights came from, so a consumer needs nothing of
glcic_fast.

The exporter is PyTorch's default one (``torch.onnx.export(dynamo=True)``, built on
torch.export; it needs onnx and onnxscript, the ``export`` extra). It keeps the batch and
the image size symbolic (the legacy TorchScript exporter, deprecated since PyTorch 2.9,
does too, but through tracing), and writes opset 18, the opset its ONNX functions are
written in (no version conversion).
"""

import contextlib
import functools
import importlib.metadata
import json
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from glcic_fast.devices import parse_dtype
from glcic_fast.files import atomic_write
from glcic_fast.nn.architecture import IN_CHANNELS, SIZE_MULTIPLE
from glcic_fast.nn.completion_net import (MEAN_FILLED_HOLE, MEAN_SUBTRACTED_ZERO_HOLE, MMAGIC_MEAN, MMAGIC_STD,
                                          SIGNED_BGR_ZERO_HOLE, CompletionNet, FusedLayer)

#: Each layer activation's name -> a torch function the ONNX exporter turns into one
#: standard operator. A new activation is one entry here.
ONNX_ACTIVATIONS = {
    "relu": torch.relu,  # Relu
    "sigmoid": torch.sigmoid,  # Sigmoid
    "hardtanh": functools.partial(torch.clamp, min=-1.0, max=1.0),  # Clip (mmagic's output layer)
}

#: Names of the graph's input and output.
INPUT_NAME, OUTPUT_NAME = "input", "output"
#: The dtypes a file can hold: ONNX Runtime's CPU provider and OpenVINO run neither
#: bfloat16 convolutions nor, therefore, a bfloat16 file.
EXPORT_DTYPES = (torch.float32, torch.float16)
#: The opset written (see the module's docstring).
OPSET = 18

#: Per input convention, how to build the network's first three input channels and how to
#: read its output, as numpy expressions of ``image`` (N x 3 x H x W, RGB in [0, 1]),
#: ``mask`` (N x 1 x H x W, 1 = fill), ``mean_pixel`` (1 x 3 x 1 x 1) and ``output`` (the
#: network's N x 3 x H x W): the input is ``concatenate([colour, mask], axis=1)``, the
#: output formula gives RGB in [0, 1]. CompletionNet's ``prepare_input`` and
#: ``output_to_image`` are what they state.
CONVENTION_FORMULAS = {
    MEAN_FILLED_HOLE: ("image * (1 - mask) + mean_pixel * mask", "output"),
    MEAN_SUBTRACTED_ZERO_HOLE: ("(image - mean_pixel) * (1 - mask)", "output"),
    # mmagic's: BGR (channels reversed), scaled to [-1, 1], hole 0; the output likewise.
    SIGNED_BGR_ZERO_HOLE: (f"(image[:, ::-1] - {MMAGIC_MEAN}) / {MMAGIC_STD} * (1 - mask)",
                           f"(output * {MMAGIC_STD} + {MMAGIC_MEAN})[:, ::-1]"),
}


class _FoldedLayer(torch.nn.Module):
    def __init__(self, layer: FusedLayer):
        super().__init__()
        spec = layer.spec
        if layer.activation not in ONNX_ACTIVATIONS:
            raise ValueError(f"{spec.name}: no ONNX export for the activation {layer.activation!r} "
                             f"(exportable: {', '.join(ONNX_ACTIVATIONS)})")
        self.activation = ONNX_ACTIVATIONS[layer.activation]
        self.conv = F.conv_transpose2d if spec.transposed else F.conv2d
        self.stride, self.padding, self.dilation = spec.stride, spec.padding, spec.dilation
        self.register_buffer("weight", layer.weight.contiguous())
        self.register_buffer("bias", layer.bias)
        affine = layer.post_scale is not None
        self.register_buffer("post_scale", layer.post_scale.view(1, -1, 1, 1) if affine else None)
        self.register_buffer("post_shift", layer.post_shift.view(1, -1, 1, 1) if affine else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                      dilation=self.dilation))
        if self.post_scale is not None:
            y = y * self.post_scale + self.post_shift
        return y


class FoldedNet(torch.nn.Module):
    """A CompletionNet's eval graph as plain PyTorch functions (conv, activation, the
    affine of a BN after the ReLU), with BN folded, in ``dtype`` on ``device``: what the
    ONNX file holds, and a reference any graph compiler can take (``torch.compile``).
    Its tensors are named after the layers (``layers.conv1.weight`` holds bn1 folded in)."""

    def __init__(self, net: CompletionNet, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        if not isinstance(net, CompletionNet):
            raise TypeError(f"expected a glcic_fast CompletionNet, got {type(net).__name__}")
        layers = net.fused_layers(dtype, torch.device(device))
        self.layers = torch.nn.ModuleDict({layer.spec.name: _FoldedLayer(layer) for layer in layers})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


def export_onnx(net: CompletionNet, path, *, dtype=torch.float32, dynamic: bool = True,
                shape: Optional[Tuple[int, int, int]] = None) -> dict:
    """Write ``net``'s eval graph (BN folded; the running statistics, whatever the net's
    mode) to the ONNX file ``path``, atomically; returns the metadata written.

    Args:
        dtype: the file's precision, input and output included: float32 or float16.
        dynamic: input ``N x 4 x H x W`` with N, H and W free (H and W multiples of 4),
            output ``N x 3 x H x W``. False fixes them to ``shape``, for engines that want
            one shape.
        shape: (N, H, W) of a fixed-shape file; only with ``dynamic=False``.
    """
    dtype = parse_dtype(dtype)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"an ONNX export is float32 or float16, got {dtype} (ONNX Runtime's CPU provider and "
                         "OpenVINO have no bfloat16 convolutions; TensorRT lowers a float32 file to fp16/bf16 itself)")
    example_shape = _example_shape(dynamic, shape)
    onnx = _import_onnx()
    graph = FoldedNet(net, dtype).eval()
    for name, tensor in graph.named_buffers():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"the folded {name} does not fit in {dtype} (BN's scale overflows it): export float32")
    example = torch.zeros(example_shape, dtype=dtype)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        # H = 4 * (H/4): the exporter then knows the output is H x W too (not a formula of
        # the strided convs' sizes), and the file names the dims 4*height_div_4 and so on.
        dynamic_shapes = ({0: dim("batch"), 2: SIZE_MULTIPLE * dim("height_div_4"),
                           3: SIZE_MULTIPLE * dim("width_div_4")},)
    with torch.no_grad(), _quiet_operator_registry():
        program = torch.onnx.export(graph, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes, verbose=False)
    model = program.model_proto
    metadata = onnx_metadata(net, dtype, "dynamic" if dynamic else "x".join(map(str, example_shape)))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = _DOC.format(**metadata)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    atomic_write(str(path), lambda f: f.write(data))
    return metadata


def onnx_metadata(net: CompletionNet, dtype: torch.dtype, shape: str) -> dict:
    """The file's metadata (ONNX metadata_props: strings): everything a consumer needs to
    build the input, read the output and know what it runs."""
    dtype_name = str(dtype).replace("torch.", "")
    if net.input_convention not in CONVENTION_FORMULAS:
        raise ValueError(f"no ONNX metadata for the input convention {net.input_convention!r} "
                         f"(known: {', '.join(CONVENTION_FORMULAS)})")
    input_formula, output_formula = CONVENTION_FORMULAS[net.input_convention]
    output_activation = net.fused_layers(dtype, torch.device("cpu"))[-1].activation
    return {
        "input": f"{INPUT_NAME}, N x {IN_CHANNELS} x H x W {dtype_name}: channels 0-2 input_formula of image "
                 f"(N x 3 x H x W, RGB in [0, 1]), mask (N x 1 x H x W, 1 = fill, 0 = keep) and mean_pixel "
                 f"(1 x 3 x 1 x 1), channel 3 the mask; H and W multiples of {SIZE_MULTIPLE} (an engine may "
                 "not check it, and then returns another size: pad the image first)",
        "input_formula": input_formula,
        "output": f"{OUTPUT_NAME}, N x 3 x H x W {dtype_name}, from the output layer's {output_activation}: "
                  "output_formula of it is RGB in [0, 1]; use that inside the hole, keep the image outside",
        "output_formula": output_formula,
        "output_activation": output_activation,
        "input_convention": net.input_convention,
        # mmagic's convention normalises with fixed constants: no mean pixel to mislead a reader.
        "mean_pixel": json.dumps(None if net.input_convention == SIGNED_BGR_ZERO_HOLE
                                 else [round(v, 6) for v in net.mean_pixel.tolist()]),
        "block_order": "conv -> ReLU -> BN (GLCIC-PyTorch)" if net.bn_after_relu else "conv -> BN -> ReLU (authors)",
        "weights_source": net.weights_source,
        "size_multiple": str(SIZE_MULTIPLE),
        "dtype": dtype_name,
        "shape": shape,
        "exported_by": f"glcic_fast {importlib.metadata.version('glcic_fast')}, torch {torch.__version__}",
    }


_DOC = ("GLCIC completion network (Iizuka et al., SIGGRAPH 2017), BatchNorm folded. Input {input}. "
        "input_formula: {input_formula}; mean_pixel (RGB): {mean_pixel}. Output {output}. output_formula: "
        "{output_formula}. Block order {block_order}; weights: {weights_source}.")


def _example_shape(dynamic: bool, shape) -> Tuple[int, int, int, int]:
    if dynamic:
        if shape is not None:
            raise ValueError("shape fixes the file's input shape: pass it with dynamic=False")
        # Batch 2: torch.export specialises a dimension whose example size is 0 or 1.
        return (2, IN_CHANNELS, 16 * SIZE_MULTIPLE, 16 * SIZE_MULTIPLE)
    if shape is None:
        raise ValueError("a fixed-shape export (dynamic=False) needs shape=(N, H, W)")
    n, h, w = (int(v) for v in shape)
    if n < 1 or h < SIZE_MULTIPLE or w < SIZE_MULTIPLE or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"shape (N, H, W) needs N >= 1 and H, W positive multiples of {SIZE_MULTIPLE}, "
                         f"got {tuple(shape)}")
    return (n, IN_CHANNELS, h, w)


@contextlib.contextmanager
def _quiet_operator_registry():
    """The exporter's operator registry warns, on every export, about torchvision operators
    it skips when torchvision is absent: none is in this graph, so the warning would only
    mislead."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registry.setLevel(level)


def _import_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise ImportError(f"exporting to ONNX needs the onnx and onnxscript packages ({exc}): "
                          "pip install 'glcic_fast[export]'") from exc
    return onnx
