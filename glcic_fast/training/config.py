"""A run's settings (``TrainConfig``), which of them define the run, and the error a run
that cannot start or continue raises. Every other module of the training imports these;
this one imports none of them but the data's ``Augmentation`` and ``FreeFormMasks``."""

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from glcic_fast.nn.architecture import OUTPUT_ACTIVATIONS
from glcic_fast.nn.discriminator import PAPER_CHANNELS
from glcic_fast.training.data import Augmentation, FreeFormMasks

#: The free-form masks' default settings (FreeFormMasks documents them).
_FREE_FORM = FreeFormMasks()

PHASES = ("completion", "discriminator", "joint")
ADVERSARIAL_LOSSES = ("non_saturating", "minimax")


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad run folder, mismatched resume, divergence)."""


@dataclass
class TrainConfig:
    """A run's settings (the ``#:`` comments and glcic_fast.training.data document each).

    Holes: ``holes="rect"`` (default) the paper's rectangles, width and height from
    ``hole_range``; ``"free"`` free-form masks for object removal, random blobs and
    strokes (data.FreeFormMasks: ``stroke_count`` strokes of ``stroke_vertices``
    vertices, ``stroke_width`` wide, segments ``stroke_length`` long; ``blob_count``
    ellipses of semi-axes ``blob_size``; sizes are fractions of ``image_size``, counts
    inclusive ranges, and the hole always covers a fraction of the image within
    ``free_area``); ``"mixed"`` each sample free-form with probability
    ``free_probability``, else a rectangle. The local discriminator's patch is centred
    on the hole (a free-form hole's bounding box) and clipped inside the image; the
    MSE and the completed image the discriminator sees use the mask itself.

    ``init``: weights to start the completion net from (glcic_fast.training.init_weights
    says what is taken from them and what starts fresh).
    """
    data: str
    out: str
    #: Steps of the three phases (Tc, Td, joint); the paper: 90000, 10000, 400000.
    phase_steps: Tuple[int, int, int] = (90000, 10000, 400000)
    #: Global batch (over all processes); the paper: 96.
    batch_size: int = 96
    image_size: int = 256
    local_size: int = 128
    hole_range: Tuple[int, int] = (96, 128)
    #: Shorter side before the crop; default (image_size, 1.5 image_size) = paper's (256, 384).
    scale_range: Optional[Tuple[int, int]] = None
    alpha: float = 0.0004
    adversarial: str = "non_saturating"
    mse_reduction: str = "mean"
    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    #: Block order of both nets: False conv -> BN -> ReLU (paper), True conv -> ReLU -> BN.
    bn_after_relu: bool = False
    #: The completion net's output layer: "sigmoid" (paper) or "hardtanh", mmagic's clamp to
    #: [-1, 1], whose nets take BGR in [-1, 1] (SIGNED_BGR_ZERO_HOLE). The losses are in RGB
    #: [0, 1] either way (CompletionNet.output_to_image).
    output_activation: str = "sigmoid"
    disc_channels: Tuple[int, ...] = PAPER_CHANNELS
    seed: int = 0
    #: "cuda", "cuda:N" or "cpu"; default cuda where there is one.
    device: Optional[str] = None
    #: "auto" (bf16 autocast on CUDA, off on CPU), "bf16" or "off".
    amp: str = "auto"
    #: channels_last activations; default on CUDA.
    channels_last: Optional[bool] = None
    #: "float32" (parameters and activations; bf16 autocast on top where amp is on) or
    #: "float64", for verification: DDP against one process, resume, ... without the
    #: float32 rounding that deep BatchNorm nets amplify (amp must be off).
    precision: str = "float32"
    #: Deterministic kernels (bit-exact resume on CUDA, slower).
    deterministic: bool = False
    workers: int = 4
    checkpoint_every: int = 1000
    keep: int = 3
    log_every: int = 10
    image_every: int = 1000
    tensorboard: bool = True
    progress: bool = True
    #: RGB in [0, 1]; default: computed over the data set once, at the start of the run.
    mean_pixel: Optional[Tuple[float, float, float]] = None
    #: Compute the mean pixel over a seeded random subset of this many images.
    mean_images: Optional[int] = None
    #: "rect" (paper), "free" (free-form strokes and blobs) or "mixed".
    holes: str = "rect"
    #: "mixed": the probability that a sample's hole is free-form.
    free_probability: float = 0.5
    #: Free-form masks: strokes and blobs per mask (inclusive ranges), vertices per stroke.
    stroke_count: Tuple[int, int] = _FREE_FORM.stroke_count
    stroke_vertices: Tuple[int, int] = _FREE_FORM.stroke_vertices
    #: Free-form masks: stroke widths, segment lengths, blob semi-axes, as fractions of image_size.
    stroke_width: Tuple[float, float] = _FREE_FORM.stroke_width
    stroke_length: Tuple[float, float] = _FREE_FORM.stroke_length
    blob_count: Tuple[int, int] = _FREE_FORM.blob_count
    blob_size: Tuple[float, float] = _FREE_FORM.blob_size
    #: Free-form masks: the fraction of the image in the hole, always within this range.
    free_area: Tuple[float, float] = _FREE_FORM.area
    #: Weights to start the completion net from (any file glcic_fast.load reads), kept
    #: as an absolute path; None: random weights from the seed.
    init: Optional[str] = None

    def __post_init__(self):
        self.phase_steps = tuple(int(v) for v in self.phase_steps)
        self.hole_range = tuple(int(v) for v in self.hole_range)
        self.disc_channels = tuple(int(v) for v in self.disc_channels)
        if self.scale_range is not None:
            self.scale_range = tuple(int(v) for v in self.scale_range)
        if self.mean_pixel is not None:
            self.mean_pixel = tuple(float(v) for v in self.mean_pixel)
        for name in ("stroke_count", "stroke_vertices", "blob_count"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("stroke_width", "stroke_length", "blob_size", "free_area"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        self.free_probability = float(self.free_probability)
        if self.init is not None:
            self.init = os.path.abspath(os.fspath(self.init))
        if len(self.phase_steps) != 3 or any(v < 0 for v in self.phase_steps):
            raise ValueError(f"phase_steps must be three non-negative step counts, got {self.phase_steps}")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {self.output_activation!r}")
        if self.adversarial not in ADVERSARIAL_LOSSES:
            raise ValueError(f"adversarial must be one of {ADVERSARIAL_LOSSES}, got {self.adversarial!r}")
        if self.mse_reduction not in ("mean", "sum"):
            raise ValueError(f"mse_reduction must be 'mean' or 'sum', got {self.mse_reduction!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {self.precision!r}")
        if self.precision == "float64" and self.amp == "bf16":
            raise ValueError("precision float64 is for exact verification: use amp 'off' (or 'auto' on a CPU)")
        for name in ("batch_size", "checkpoint_every", "keep", "log_every", "image_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.augmentation()  # validates the sizes

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps)

    def augmentation(self) -> Augmentation:
        free_form = FreeFormMasks(stroke_count=self.stroke_count, stroke_vertices=self.stroke_vertices,
                                  stroke_width=self.stroke_width, stroke_length=self.stroke_length,
                                  blob_count=self.blob_count, blob_size=self.blob_size, area=self.free_area)
        return Augmentation(self.image_size, self.local_size, self.hole_range, self.scale_range, holes=self.holes,
                            free_probability=self.free_probability, free_form=free_form)

    def phase(self, step: int) -> str:
        tc, td, _ = self.phase_steps
        return PHASES[0] if step < tc else PHASES[1] if step < tc + td else PHASES[2]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Settings a resumed run must share with the checkpoint for the resume to continue the
#: same run (data, losses, optimiser, nets). The others may change between sessions.
RUN_DEFINING = ("batch_size", "image_size", "local_size", "hole_range", "scale_range", "alpha", "adversarial",
                "mse_reduction", "lr", "rho", "eps", "bn_after_relu", "output_activation", "disc_channels", "seed", "precision",
                "holes", "free_probability", "stroke_count", "stroke_vertices", "stroke_width", "stroke_length",
                "blob_count", "blob_size", "free_area", "init")


def check_same_run(saved: dict, cfg: TrainConfig, done: int):
    """Raise TrainingError unless ``cfg`` continues the run whose config is ``saved`` after
    ``done`` steps: the same run-defining settings, and no phase boundary already passed
    moved."""
    problems = []
    for key in RUN_DEFINING:
        theirs, ours = saved.get(key, TrainConfig.__dataclass_fields__[key].default), getattr(cfg, key)
        if isinstance(theirs, list):
            theirs = tuple(theirs)
        if key == "scale_range":  # compare the effective ranges
            theirs = tuple(Augmentation(saved["image_size"], saved["local_size"], saved["hole_range"],
                                        theirs).scale_range)
            ours = cfg.augmentation().scale_range
        if theirs != ours:
            problems.append(f"{key}: run has {theirs!r}, asked for {ours!r}")
    old = tuple(saved["phase_steps"])
    tc, td = old[0], old[0] + old[1]
    new_tc, new_td = cfg.phase_steps[0], cfg.phase_steps[0] + cfg.phase_steps[1]
    # Phase boundaries already passed cannot move; later ones may (e.g. a longer joint phase).
    if (min(done, tc) != min(done, new_tc)) or (min(done, td) != min(done, new_td)):
        problems.append(f"phase_steps: run has {old}, asked for {cfg.phase_steps}: "
                        f"the {done} steps done would belong to other phases")
    if problems:
        raise TrainingError("the run folder holds a different run; resume it with the same settings "
                            "(or start a new run in another folder):\n  " + "\n  ".join(problems))


#: Settings of one session rather than of the run: a resume does not take them from the run.
SESSION_SETTINGS = ("device", "workers", "progress", "tensorboard")


def continuing_config(saved: Optional[dict], data: str, out: str, given: dict) -> TrainConfig:
    """The config of a session that resumes the run whose config is ``saved`` (None: the
    run has none yet): the settings ``given``, and the run's for those not given, but for
    the session's own (SESSION_SETTINGS) and the mean pixel (restored from the checkpoint)."""
    base = {k: v for k, v in (saved or {}).items()
            if k not in SESSION_SETTINGS + ("data", "out", "mean_pixel")}
    base.update(given, data=data, out=out)
    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in base.items() if k in fields})
