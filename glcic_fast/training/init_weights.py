"""Starting a run from weights users hold (``TrainConfig.init``, ``--init WEIGHTS``), to
fine-tune the authors' (or GLCIC-PyTorch's, or a glcic_fast run's) completion network on
one's own photos. Anything ``glcic_fast.load`` reads is accepted, through that one call.

What the run takes from the weights, and what starts fresh:

- the completion net: its weights and BatchNorm statistics, the weights';
- the discriminator: fresh, from the run's seed, as in any new run (one trained against
  another generator, if the file held one, would judge the wrong mistakes); both
  ADADELTA optimisers fresh; the run starts at step 0, and ``phase_steps`` say which
  phases it runs: ``0 TD TJ`` trains a discriminator against the loaded net first, then
  both (fine-tuning with the adversarial loss), ``TC 0 0`` the MSE alone;
- the block order and the output activation: the run's (``bn_after_relu``,
  ``output_activation``) must be the weights' own, which the loaded net reports
  (mmagic's nets: the authors' order and ``hardtanh``); otherwise a TrainingError says
  which setting to give;
- the input convention: the run trains nets that take their input the way their block
  order's and output activation's models do (``default_input_convention``: the authors',
  GLCIC-PyTorch's or mmagic's); weights that take it otherwise are refused, clearly;
- the mean pixel: the weights' own (the net learned its first filters, and the value it
  sees in the hole, with it), unless ``mean_pixel`` is given; then no pass over the
  data computes one. mmagic's nets have a fixed normalisation instead (their file holds
  no mean pixel): the run keeps the loaded net's default, which then only fills the hole
  in the TensorBoard samples;
- resuming: a run's checkpoint holds its weights, and wins. The weights file is read
  only while the run has no checkpoint yet, and ``init`` is one of the settings that
  define a run: a resume may repeat the run's own ``init`` or leave it out, not name
  another file.

The run's config.json and every checkpoint record where the weights came from
(``init_weights``: absolute path, SHA-256 of the file, the layout ``glcic_fast.load``
recognised, block order, output activation, the file's own mean pixel or None where it
holds none).
"""

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from glcic_fast.nn.completion_net import SIGNED_BGR_ZERO_HOLE, CompletionNet, default_input_convention
from glcic_fast.nn.state_dict import WeightsError
from glcic_fast.nn.weights import load
from glcic_fast.training.config import TrainConfig, TrainingError


@dataclass
class InitialWeights:
    #: The completion net's state dict (canonical keys, on the CPU).
    state: Dict[str, torch.Tensor]
    #: The run's mean pixel: the weights', or the one the config gives.
    mean_pixel: List[float]
    #: What the run records about them (``init_weights`` in config.json and checkpoints).
    record: dict


def _block_order(bn_after_relu: bool) -> str:
    return "conv -> ReLU -> BN (GLCIC-PyTorch)" if bn_after_relu else "conv -> BN -> ReLU (the authors')"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load(cfg: TrainConfig) -> Tuple[CompletionNet, Optional[List[float]]]:
    """The net in ``cfg.init`` and the mean pixel the file gives: None where it gives none
    (mmagic's, with a fixed normalisation instead; a GLCIC-PyTorch checkpoint without its
    config.json or a .t7 without "mean", which need one: the mean pixel the run is given
    then stands in, as the file's config would)."""
    try:
        net = load(cfg.init)
    except WeightsError:
        if cfg.mean_pixel is None:
            raise
        return load(cfg.init, config={"mean_pixel": list(cfg.mean_pixel)}), None
    if net.input_convention == SIGNED_BGR_ZERO_HOLE:
        return net, None
    return net, [float(v) for v in net.mean_pixel.tolist()]


def load_initial_weights(cfg: TrainConfig) -> Optional[InitialWeights]:
    """The weights ``cfg.init`` names, checked against the run (None without ``init``).
    Raises TrainingError for a file glcic_fast.load cannot read or a net the run cannot
    train."""
    if cfg.init is None:
        return None
    try:
        net, own_mean = _load(cfg)
    except (WeightsError, OSError) as exc:
        hint = "" if cfg.mean_pixel is not None else " (where the file holds no mean pixel, give --mean-pixel R G B)"
        raise TrainingError(f"cannot start from --init {cfg.init}: {exc}{hint}") from exc
    if net.bn_after_relu != cfg.bn_after_relu:
        flag = "add --bn-after-relu (bn_after_relu=True)" if net.bn_after_relu else \
            "leave out --bn-after-relu (bn_after_relu=False)"
        raise TrainingError(f"--init {cfg.init} holds a {_block_order(net.bn_after_relu)} net "
                            f"({net.weights_source}), but this run trains {_block_order(cfg.bn_after_relu)} "
                            f"nets: {flag} to fine-tune it")
    if net.output_activation != cfg.output_activation:
        raise TrainingError(f"--init {cfg.init} holds a net whose output layer is {net.output_activation!r} "
                            f"({net.weights_source}), but this run trains {cfg.output_activation!r} nets: give "
                            f"--output-activation {net.output_activation} (output_activation="
                            f"{net.output_activation!r}) to fine-tune it")
    expected = default_input_convention(net.bn_after_relu, net.output_activation)
    if net.input_convention != expected:
        raise TrainingError(f"--init {cfg.init} takes its input as {net.input_convention!r}; training builds "
                            f"{_block_order(net.bn_after_relu)} {net.output_activation} nets that take it as "
                            f"{expected!r}, so these weights cannot be fine-tuned here")
    if cfg.mean_pixel is not None:
        mean = list(cfg.mean_pixel)
    else:
        mean = own_mean if own_mean is not None else [float(v) for v in net.mean_pixel.tolist()]
    record = {"path": cfg.init, "sha256": file_sha256(cfg.init), "weights": net.weights_source,
              "bn_after_relu": net.bn_after_relu, "output_activation": net.output_activation,
              "mean_pixel": own_mean}
    state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    return InitialWeights(state, mean, record)
