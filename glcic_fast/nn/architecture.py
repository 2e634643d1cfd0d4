"""The completion network's layer table (SPEC.md section 1), the one place it is written.

The reference network, the fast network and the weight loaders all read this table, so
a layer's shape is never written twice. Layer names are GLCIC-PyTorch's module names
(``conv1`` .. ``conv12``, ``deconv13``, ``conv14``, ``deconv15``, ``conv16``, ``conv17``);
layer k (1..16) is followed by batch norm ``bn{k}``.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    name: str
    index: int  # 1-based position in the paper's table
    transposed: bool
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int

    @property
    def has_bn(self) -> bool:
        return self.index < len(COMPLETION_LAYERS)

    @property
    def activation(self) -> str:
        """ReLU, and the paper's sigmoid for the output layer (a net may run another of
        ``OUTPUT_ACTIVATIONS`` there: ``CompletionNet.output_activation``)."""
        return "relu" if self.has_bn else "sigmoid"

    @property
    def weight_shape(self) -> tuple:
        k = self.kernel_size
        if self.transposed:  # ConvTranspose2d stores (in, out, kh, kw)
            return (self.in_channels, self.out_channels, k, k)
        return (self.out_channels, self.in_channels, k, k)


def _conv(i, cin, cout, k=3, stride=1, dilation=1, padding=None):
    pad = dilation * (k - 1) // 2 if padding is None else padding
    return LayerSpec(f"conv{i}", i, False, cin, cout, k, stride, pad, dilation)


def _deconv(i, cin, cout):
    return LayerSpec(f"deconv{i}", i, True, cin, cout, 4, 2, 1, 1)


COMPLETION_LAYERS = (
    _conv(1, 4, 64, k=5),
    _conv(2, 64, 128, stride=2),
    _conv(3, 128, 128),
    _conv(4, 128, 256, stride=2),
    _conv(5, 256, 256),
    _conv(6, 256, 256),
    _conv(7, 256, 256, dilation=2),
    _conv(8, 256, 256, dilation=4),
    _conv(9, 256, 256, dilation=8),
    _conv(10, 256, 256, dilation=16),
    _conv(11, 256, 256),
    _conv(12, 256, 256),
    _deconv(13, 256, 128),
    _conv(14, 128, 128),
    _deconv(15, 128, 64),
    _conv(16, 64, 32),
    _conv(17, 32, 3),
)

#: The output layer's activations weights are trained with: the paper's sigmoid (output in
#: (0, 1)), or "hardtanh", a clamp to [-1, 1]: mmagic's Global&Local generator
#: (GLDecoder's out_act="clip", its default, in every published config).
OUTPUT_ACTIVATIONS = ("sigmoid", "hardtanh")

#: Input channels: RGB with the hole blanked, plus the mask.
IN_CHANNELS = 4
#: H and W must be multiples of this (two stride-2 convs, two stride-2 deconvs).
SIZE_MULTIPLE = 4


def layer_output_sizes(height: int, width: int):
    """(spec, H_out, W_out) of each layer, in order, for an H x W input."""
    sizes, h, w = [], height, width
    for spec in COMPLETION_LAYERS:
        h, w = (h * spec.stride, w * spec.stride) if spec.transposed else (h // spec.stride, w // spec.stride)
        sizes.append((spec, h, w))
    return sizes


def layer_macs(spec: LayerSpec, out_height: int, out_width: int) -> int:
    """Multiply-accumulates of one layer done as direct convolution, per image (a transposed
    conv counts only the taps that meet real input pixels: k*k/stride^2 per output pixel)."""
    taps = spec.kernel_size ** 2 // (spec.stride ** 2 if spec.transposed else 1)
    return out_height * out_width * spec.out_channels * spec.in_channels * taps


def completion_macs(height: int, width: int) -> int:
    """Multiply-accumulates of one forward pass at H x W, every layer done as direct convolution."""
    return sum(layer_macs(spec, h, w) for spec, h, w in layer_output_sizes(height, width))
