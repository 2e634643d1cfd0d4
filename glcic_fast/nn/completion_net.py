"""CompletionNet: a drop-in replacement for the GLCIC completion network.

Same modules and state-dict keys as the reference (GLCIC-PyTorch's names), so in train
mode it *is* the reference: outputs, gradients and BatchNorm batch statistics are the
reference's. In eval mode every layer is one fused op (``glcic_fast.ops``): BatchNorm is
folded into the conv where the block is conv -> BN -> ReLU, or applied as a per-channel
affine inside the same op after the activation where it is conv -> ReLU -> BN.

The network's own input and output are those of the weights' origin (``forward`` is the
drop-in); ``prepare_input`` and ``output_to_image`` map an RGB image in [0, 1] and a hole
mask to that input, and the raw output back to RGB in [0, 1], per the input convention.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from glcic_fast import ops
from glcic_fast.nn.architecture import COMPLETION_LAYERS, IN_CHANNELS, SIZE_MULTIPLE
from glcic_fast.nn.reference import ReferenceCompletionNet, check_output_activation
from glcic_fast.nn.state_dict import (AUTHORS_SEQUENTIAL, MMAGIC, WeightsError, proven_block_order,
                                      to_canonical_state_dict)

#: The authors' Torch7 convention: mean pixel subtracted, hole pixels set to 0.
MEAN_SUBTRACTED_ZERO_HOLE = "mean_subtracted_zero_hole"
#: GLCIC-PyTorch's convention: image in [0, 1], hole pixels set to the mean pixel (mpv).
MEAN_FILLED_HOLE = "mean_filled_hole"
#: mmagic's Global&Local convention: the image in BGR order, scaled to [-1, 1] (mmagic's
#: normalisation, mean = std = 127.5 of 255), hole pixels set to 0 (mid-grey), the mask
#: appended as channel 4; the output is BGR in [-1, 1] too (clamped there).
SIGNED_BGR_ZERO_HOLE = "signed_bgr_zero_hole"
INPUT_CONVENTIONS = (MEAN_SUBTRACTED_ZERO_HOLE, MEAN_FILLED_HOLE, SIGNED_BGR_ZERO_HOLE)
#: mmagic's normalisation of an image in [0, 1]: (x - mean) / std.
MMAGIC_MEAN = MMAGIC_STD = 127.5 / 255

#: The output activation whose range each input convention reads the output in: the
#: sigmoid's (0, 1) for the image conventions, the clamp's [-1, 1] for mmagic's.
_CONVENTION_OUTPUT_ACTIVATION = {MEAN_SUBTRACTED_ZERO_HOLE: "sigmoid", MEAN_FILLED_HOLE: "sigmoid",
                                 SIGNED_BGR_ZERO_HOLE: "hardtanh"}


def default_input_convention(bn_after_relu: bool, output_activation: str = "sigmoid") -> str:
    """The input convention that goes with a block order and output activation: mmagic's
    for the clamp to [-1, 1]; else GLCIC-PyTorch's (conv -> ReLU -> BN) fills the hole with
    the mean pixel, the authors' subtracts it and zeroes the hole."""
    if output_activation == "hardtanh":
        return SIGNED_BGR_ZERO_HOLE
    return MEAN_FILLED_HOLE if bn_after_relu else MEAN_SUBTRACTED_ZERO_HOLE


def _check_convention(input_convention: str, output_activation: str):
    """ValueError unless the convention reads the output in the range the activation gives."""
    needed = _CONVENTION_OUTPUT_ACTIVATION[input_convention]
    if output_activation != needed:
        raise ValueError(f"input convention {input_convention!r} reads the network's output as "
                         f"{'[-1, 1]' if needed == 'hardtanh' else '(0, 1)'}, which output_activation={needed!r} "
                         f"gives; this net's output_activation is {output_activation!r}")


#: ``bn_after_relu`` of the PyTorch model users have (GLCIC-PyTorch): the order a net runs
#: when neither its constructor nor its weights choose one.
GLCIC_PYTORCH_ORDER = True

#: The authors' places2 mean pixel (RGB), SPEC.md section 6a.
PLACES2_MEAN_PIXEL = (0.4560, 0.4472, 0.4155)


class FusedLayer(NamedTuple):
    """One layer as the fused op runs it: act(conv(x, weight) + bias) [* post_scale + post_shift]."""
    spec: object
    weight: torch.Tensor
    bias: torch.Tensor
    post_scale: Optional[torch.Tensor]
    post_shift: Optional[torch.Tensor]
    #: The epilogue's activation (a name of glcic_fast.ops.conv2d_bias_act's ACTIVATIONS).
    activation: str


class CompletionNet(ReferenceCompletionNet):
    """The GLCIC completion network C(x, M): N x 4 x H x W -> N x 3 x H x W, in (0, 1)
    through the paper's sigmoid, or in [-1, 1] through mmagic's clamp.

    Args:
        bn_after_relu: the block order. True: conv -> ReLU -> BN (GLCIC-PyTorch); False:
            conv -> BN -> ReLU (the authors' model). None (default): not chosen. The net
            then runs GLCIC-PyTorch's order, the PyTorch model users have, until
            ``load_state_dict`` is given weights that prove the authors' order (their
            nn.Sequential keys, or BN statistics only that order learns), which it then
            takes. A net built with an explicit order refuses such weights with a
            ``WeightsError`` instead of running the wrong graph.
        output_activation: the output layer's, one of ``OUTPUT_ACTIVATIONS``: "sigmoid"
            (the paper's) or "hardtanh" (mmagic's clip to [-1, 1]). None (default): not
            chosen: ``load_state_dict`` takes the one the weights' layout tells (mmagic's
            clamps: GLDecoder's default out_act="clip"; the authors' sigmoid); for a state
            dict under this package's own keys, which does not tell, the one
            ``input_convention`` reads if that is given, else the sigmoid (glcic_fast.save
            and load keep it).
        input_convention: how ``complete`` builds the input and reads the output; defaults
            to the block order's and output activation's own (authors: mean subtracted and
            hole zeroed; GLCIC-PyTorch: hole filled with the mean pixel; mmagic:
            ``SIGNED_BGR_ZERO_HOLE``).
        mean_pixel: RGB mean pixel in [0, 1]; defaults to the places2 mean. (mmagic's
            convention has its own fixed normalisation, MMAGIC_MEAN and MMAGIC_STD.)
        backend: None lets the dispatcher choose per layer; or "torch", "triton", "cuda".
    """

    def __init__(self, bn_after_relu: Optional[bool] = None, *, output_activation: Optional[str] = None,
                 input_convention: Optional[str] = None, mean_pixel=None, backend: Optional[str] = None):
        activation = output_activation
        if input_convention is not None:
            _check_input_convention_name(input_convention)
            if activation is None:  # the one whose range the convention reads
                activation = _CONVENTION_OUTPUT_ACTIVATION[input_convention]
        super().__init__(GLCIC_PYTORCH_ORDER if bn_after_relu is None else bool(bn_after_relu), activation or "sigmoid")
        #: Why the net runs the block order it runs (shown by repr).
        self.block_order_reason = "default, GLCIC-PyTorch's" if bn_after_relu is None else "chosen"
        self._order_chosen = bn_after_relu is not None
        self._output_activation_chosen = output_activation is not None
        if input_convention is not None:
            _check_convention(input_convention, self.output_activation)
        self._convention = input_convention
        self.mean_pixel = _as_mean_pixel(PLACES2_MEAN_PIXEL if mean_pixel is None else mean_pixel)
        self.backend = backend
        #: Where the weights came from (set by glcic_fast.load): "random init" until loaded.
        self.weights_source = "random init"
        self._fused_cache = None

    @property
    def input_convention(self) -> str:
        """Set, or else the block order's and output activation's own (it follows what
        ``load_state_dict`` takes)."""
        if self._convention is not None:
            return self._convention
        return default_input_convention(self.bn_after_relu, self.output_activation)

    @input_convention.setter
    def input_convention(self, value: str):
        _check_input_convention_name(value)
        _check_convention(value, self.output_activation)
        self._convention = value

    def extra_repr(self) -> str:
        order = "conv -> ReLU -> BN (GLCIC-PyTorch)" if self.bn_after_relu else "conv -> BN -> ReLU (authors)"
        if self.input_convention == SIGNED_BGR_ZERO_HOLE:
            mean = "none (mmagic's fixed normalisation)"
        else:
            mean = "(" + ", ".join(f"{v:.4f}" for v in self.mean_pixel.tolist()) + ")"
        return (f"block order: {order} ({self.block_order_reason}), output activation: {self.output_activation}, "
                f"input convention: {self.input_convention}, mean pixel: {mean}, weights: {self.weights_source}, "
                f"backend: {self.backend or 'auto'}")

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_network_input(x)
        if self.training:
            return super().forward(x)
        h = x
        for layer in self.fused_layers(x.dtype, x.device):
            h = _run_fused_layer(layer, h, self.backend)
        return h.contiguous()

    def layer_backends(self, x: torch.Tensor) -> Dict[str, Tuple[Optional[str], List[str]]]:
        """Per layer name: (the backend the dispatcher picks for input ``x`` in eval mode, or
        None; one line for each faster backend passed over, with the reason)."""
        choices, h = {}, torch.empty_like(x)
        with torch.inference_mode():
            for layer in self.fused_layers(x.dtype, x.device):
                name = "conv_transpose2d_bias_act" if layer.spec.transposed else "conv2d_bias_act"
                args = (h, layer.weight, layer.bias, layer.spec.stride, layer.spec.padding, layer.spec.dilation,
                        layer.activation, layer.post_scale, layer.post_shift)
                choices[layer.spec.name] = ops.explain(name, x.device, *args, backend=self.backend)
                h = _run_fused_layer(layer, h, "torch")  # only the next layer's input shape matters
        return choices

    def explain_backends(self, x: torch.Tensor) -> List[str]:
        """One line per layer: the backend the dispatcher picks for input ``x`` in eval mode,
        and why faster ones were passed over (``layer_backends``, in words)."""
        lines = []
        for name, (chosen, skipped) in self.layer_backends(x).items():
            passed_over = f" (passed over: {'; '.join(skipped)})" if skipped else ""
            lines.append(f"{name}: {chosen or 'none'}{passed_over}")
        return lines

    # -- BatchNorm folding -------------------------------------------------------------
    def fused_layers(self, dtype: torch.dtype, device: torch.device) -> List[FusedLayer]:
        """Per layer: weight and bias with BN folded in (or BN as an affine after the
        activation), in ``dtype`` on ``device``, weights in channels_last.

        Cached until a parameter or buffer changes (an optimiser step, load_state_dict,
        .to()): the key holds every tensor's storage pointer and in-place version counter.
        Inference tensors (a net built or loaded under inference_mode) have no version
        counter: they are compared bit for bit with a copy taken when they were folded,
        which costs a read of the weights (and one device sync) per call instead of a fold
        and a repacking per call. While autograd records, or torch.compile traces, the
        folding is recomputed inside the graph: gradients reach the parameters, and the
        compiled graph follows them."""
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if recording or torch.compiler.is_compiling():  # traced: the fold becomes part of the graph
            return self._fold(dtype, device)
        # The children are the convs and BNs themselves: reading their tensors directly is
        # several times cheaper than parameters()/buffers(), and this runs every forward.
        tensors = [t for m in self._modules.values() for d in (m._parameters, m._buffers) for t in d.values()]
        key = (dtype, device, self.bn_after_relu, self.output_activation,
               tuple((t.data_ptr(), t.shape, None if t.is_inference() else t._version) for t in tensors))
        cached = self._fused_cache
        if cached is not None and cached[0] == key and _same_bits(tensors, cached[2]):
            return cached[1]
        # Normal (not inference) tensors even when called under inference_mode, so that
        # backends can key their own caches on the folded weights' version counters.
        with torch.inference_mode(False), torch.no_grad():
            copies = [t.clone() if t.is_inference() else None for t in tensors]
            self._fused_cache = (key, self._fold(dtype, device), copies)
        return self._fused_cache[1]

    def _fold(self, dtype, device) -> List[FusedLayer]:
        layers = []
        for spec in COMPLETION_LAYERS:
            conv = getattr(self, spec.name)
            # Fold in float64: the folded weights then round once, to the target dtype.
            weight, bias = conv.weight.double(), conv.bias.double()
            post_scale = post_shift = None
            if spec.has_bn:
                bn = getattr(self, f"bn{spec.index}")
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                shift = bn.bias.double() - bn.running_mean.double() * scale
                if self.bn_after_relu:  # ReLU sits between conv and BN: BN stays an affine
                    post_scale, post_shift = scale, shift
                else:
                    out_axis = 1 if spec.transposed else 0
                    shape = [1, 1, 1, 1]
                    shape[out_axis] = -1
                    weight = weight * scale.view(shape)
                    bias = bias * scale + shift
            cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
            weight = cast(weight).contiguous(memory_format=torch.channels_last)
            activation = spec.activation if spec.has_bn else check_output_activation(self.output_activation)
            layers.append(FusedLayer(spec, weight, cast(bias), cast(post_scale), cast(post_shift), activation))
        return layers

    # -- weights ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """The drop-in contract, on every way weights reach this net (its own
        ``load_state_dict``, a parent module's or a wrapper's, ``nn.Module.load_state_dict``):
        it accepts this network's own keys (GLCIC-PyTorch's, with or without the ``module.``
        prefix), the authors' layout converted to PyTorch (nn.Sequential keys ``0.weight``,
        ``1.running_mean``, ...) and mmagic's Global&Local generator
        (``generator.encoder.enc1.conv.weight``, ... or the generator's own keys), and runs
        the graph the weights need: the authors' block order where the state dict proves it
        (their nn.Sequential keys, mmagic's, or a negative BN running mean, which only
        conv -> BN -> ReLU learns), else GLCIC-PyTorch's, unless the net was built with an
        explicit ``bn_after_relu``; mmagic's clamp to [-1, 1] for mmagic's layout, else the
        sigmoid, unless built with an explicit ``output_activation``. A state dict that
        proves the other order than the one chosen, or whose output activation the chosen
        input convention cannot read, raises ``WeightsError`` before any tensor is loaded."""
        own = {key[len(prefix):]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(prefix)]}
        canonical, layout = to_canonical_state_dict(own)
        proven, reason = proven_block_order(canonical, layout)
        if self._order_chosen and proven is not None and proven != self.bn_after_relu:
            raise WeightsError(
                f"this CompletionNet was built with bn_after_relu={self.bn_after_relu} "
                f"({'conv -> ReLU -> BN' if self.bn_after_relu else 'conv -> BN -> ReLU'}), but these weights "
                f"are for {'conv -> ReLU -> BN' if proven else 'conv -> BN -> ReLU'}: {reason}. Build "
                f"CompletionNet(bn_after_relu={proven}), or leave bn_after_relu unset to follow the weights")
        activation = self.output_activation
        if not self._output_activation_chosen:
            activation = layout_output_activation(layout) or (
                _CONVENTION_OUTPUT_ACTIVATION[self._convention] if self._convention is not None else "sigmoid")
        if self._convention is not None:
            try:
                _check_convention(self._convention, activation)
            except ValueError as exc:
                raise WeightsError(f"these weights ({layout} layout) run output_activation={activation!r}: {exc}. "
                                   "Leave input_convention unset to follow the weights") from None
        if not self._order_chosen:
            self.bn_after_relu = GLCIC_PYTORCH_ORDER if proven is None else proven
            self.block_order_reason = "default, GLCIC-PyTorch's" if proven is None else f"from the weights: {reason}"
        self.output_activation = activation
        state_dict.update({prefix + key: value for key, value in canonical.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- completion -----------------------------------------------------------------------
    def complete(self, image: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Fill the holes of ``image`` (see :func:`glcic_fast.inference.completion.complete_with`)."""
        from glcic_fast.inference.completion import complete_with

        return complete_with(self, image, mask, **kwargs)

    def prepare_input(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """The network's 4-channel input for ``image`` (N x 3 x H x W, RGB in [0, 1]) and
        a binary ``hole`` mask (N x 1 x H x W, 1 = fill), per the net's input convention."""
        convention = self.input_convention
        _check_convention(convention, self.output_activation)
        if convention == SIGNED_BGR_ZERO_HOLE:
            colour = (image.flip(1) - MMAGIC_MEAN) / MMAGIC_STD * (1 - hole)
        else:
            mean = self.mean_pixel.to(device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
            if convention == MEAN_SUBTRACTED_ZERO_HOLE:
                colour = (image - mean) * (1 - hole)
            else:
                colour = image * (1 - hole) + mean * hole
        return torch.cat([colour, hole], dim=1)

    def output_to_image(self, y: torch.Tensor) -> torch.Tensor:
        """The RGB image in [0, 1] that the network's raw output ``y = net(x)`` (N x 3 x H
        x W) stands for, per the input convention: ``y`` itself for the sigmoid's; for
        mmagic's, ``y`` from BGR in [-1, 1] back to RGB in [0, 1] (its denormalisation,
        y * std + mean). Pointwise, so crops and tiles map alike."""
        _check_convention(self.input_convention, self.output_activation)
        if self.input_convention == SIGNED_BGR_ZERO_HOLE:
            return (y * MMAGIC_STD + MMAGIC_MEAN).flip(1)
        return y


def _same_bits(tensors: List[torch.Tensor], copies: List[Optional[torch.Tensor]]) -> bool:
    """Whether every tensor holds its copy's bits exactly (a NaN equals itself, -0.0 differs
    from 0.0), where a copy was kept; one device sync for all of them."""
    def bits(t):  # the same bytes as integers, so that comparing them compares bits
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    differs = [torch.ne(bits(t), bits(copy)).any() for t, copy in zip(tensors, copies) if copy is not None]
    return not differs or not bool(torch.stack(differs).any())


def _run_fused_layer(layer: FusedLayer, h: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    op = ops.conv_transpose2d_bias_act if layer.spec.transposed else ops.conv2d_bias_act
    return op(h, layer.weight, layer.bias, stride=layer.spec.stride, padding=layer.spec.padding,
              dilation=layer.spec.dilation, activation=layer.activation,
              post_scale=layer.post_scale, post_shift=layer.post_shift, backend=backend)


def check_network_input(x: torch.Tensor):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != IN_CHANNELS:
        raise ValueError(f"the completion network takes N x {IN_CHANNELS} x H x W (RGB with the hole "
                         f"blanked, plus the mask), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"H and W must be multiples of {SIZE_MULTIPLE}, got {h} x {w}; "
                         f"CompletionNet.complete pads any size for you")
    if not x.is_floating_point():
        raise TypeError(f"the network input must be floating point, got {x.dtype}")


def layout_output_activation(layout: str) -> Optional[str]:
    """The output activation weights in ``layout`` (state_dict's layouts) were trained
    with: mmagic's clamp for its Global&Local generator (GLDecoder's default out_act="clip",
    the one its published configs keep), the sigmoid for the authors'; None for this
    package's own keys (GLCIC-PyTorch's), which any net may have been saved under."""
    return {MMAGIC: "hardtanh", AUTHORS_SEQUENTIAL: "sigmoid"}.get(layout)


def _check_input_convention_name(value):
    if value not in INPUT_CONVENTIONS:
        raise ValueError(f"input_convention must be one of {INPUT_CONVENTIONS}, got {value!r}")


def _as_mean_pixel(value) -> torch.Tensor:
    mean = torch.as_tensor(value, dtype=torch.float32).flatten()
    if mean.numel() == 1:
        mean = mean.expand(3).clone()
    if mean.numel() != 3 or not torch.isfinite(mean).all() or (mean < 0).any() or (mean > 1).any():
        raise ValueError(f"mean pixel must be 3 (or 1) values in [0, 1], got {value!r}")
    return mean
