"""How well a network completes photos it was not trained on: PSNR inside the holes, side
by side with OpenCV's Telea inpainting (the classical baseline).

Each photo gets ``holes_per_photo`` single rectangular holes drawn at random (seeded), one
at a time, as in training; every method fills the same holes. A hole's score is the PSNR
(peak 1.0) over its pixels and channels; a photo's score is the mean over its holes, in dB.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import cv2
import numpy as np
import torch

from glcic_fast.imageio import array_to_tensor, tensor_to_array

#: cv2.inpaint's neighbourhood radius for the Telea baseline (OpenCV's samples use 3).
TELEA_RADIUS = 3
#: "flat fill + blend" is the paper's post-processing applied to holes filled with the
#: photo's mean colour: what the blend achieves without the network, so that the
#: network's own share of "glcic_fast + blend" can be read off.
METHODS = ("glcic_fast", "glcic_fast + blend", "flat fill + blend", "OpenCV Telea")


@dataclass(frozen=True)
class Score:
    photo: str
    method: str
    psnr: float  # dB, mean over the photo's holes
    holes: int


def psnr_in_holes(result: torch.Tensor, truth: torch.Tensor, hole: torch.Tensor) -> float:
    """PSNR in dB (peak 1.0) of ``result`` against ``truth`` (C x H x W in [0, 1]) over the
    pixels where ``hole`` (1 x H x W) is set; inf when they agree there."""
    inside = hole.bool().expand_as(truth)
    if not inside.any():
        raise ValueError("the hole is empty: no pixels to score")
    mse = (result.double() - truth.double())[inside].pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def random_hole(height: int, width: int, size_range: Tuple[int, int], generator: torch.Generator):
    """(y, x, h, w) of a hole whose sides are drawn independently from ``size_range``
    (inclusive, clipped to the image), placed uniformly inside the image."""
    lo, hi = size_range
    h, w = (min(int(torch.randint(lo, hi + 1, (), generator=generator)), side) for side in (height, width))
    y = int(torch.randint(0, height - h + 1, (), generator=generator))
    x = int(torch.randint(0, width - w + 1, (), generator=generator))
    return y, x, h, w


def telea(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """``image`` (3 x H x W in [0, 1]) with the hole filled by cv2.inpaint's Telea method
    on the 8-bit image; the input's values outside the hole."""
    mask = (hole[0].cpu().numpy() > 0).astype(np.uint8) * 255
    filled = array_to_tensor(cv2.inpaint(tensor_to_array(image), mask, TELEA_RADIUS, cv2.INPAINT_TELEA))
    return torch.where(hole.bool().cpu(), filled, image.cpu())


def compare(net, photos: Mapping[str, torch.Tensor], *, holes_per_photo: int = 10,
            hole_range: Tuple[int, int] = (96, 128), seed: int = 0) -> List[Score]:
    """Scores of :data:`METHODS` on each photo (3 x H x W in [0, 1]): the network's raw
    completion, the same with the paper's post-processing, the post-processing of a flat
    fill, and Telea."""
    from glcic_fast.inference.completion import complete_with
    from glcic_fast.inference.postprocess import postprocess

    if holes_per_photo < 1:
        raise ValueError(f"holes_per_photo must be at least 1, got {holes_per_photo}")
    device = next(net.parameters()).device
    scores = []
    for name, truth in photos.items():
        generator = torch.Generator().manual_seed(seed)
        per_method: Dict[str, List[float]] = {m: [] for m in METHODS}
        _, height, width = truth.shape
        for _ in range(holes_per_photo):
            y, x, h, w = random_hole(height, width, hole_range, generator)
            hole = torch.zeros(1, height, width)
            hole[:, y:y + h, x:x + w] = 1
            inside = hole.bool()
            raw = complete_with(net, truth.to(device), hole.to(device)).cpu().float()
            known_mean = truth[:, ~inside[0]].mean(dim=1).view(3, 1, 1)
            flat = torch.where(inside, known_mean, truth)
            results = {"glcic_fast": raw, "glcic_fast + blend": postprocess(raw, inside),
                       "flat fill + blend": postprocess(flat, inside), "OpenCV Telea": telea(truth, hole)}
            for method, result in results.items():
                per_method[method].append(psnr_in_holes(result, truth, hole))
        scores += [Score(name, m, float(np.mean(v)), len(v)) for m, v in per_method.items()]
    return scores


def markdown_table(scores: Sequence[Score]) -> str:
    """One row per photo, one column per method (mean PSNR in dB), and the mean row."""
    photos = list(dict.fromkeys(s.photo for s in scores))
    methods = list(dict.fromkeys(s.method for s in scores))
    value = {(s.photo, s.method): s.psnr for s in scores}
    holes = {s.photo: s.holes for s in scores}
    lines = ["| photo | holes | " + " | ".join(f"{m} (dB)" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for p in photos:
        lines.append(f"| {p} | {holes[p]} | " + " | ".join(f"{value[p, m]:.2f}" for m in methods) + " |")
    means = [np.mean([value[p, m] for p in photos]) for m in methods]
    lines.append("| **mean** | | " + " | ".join(f"**{v:.2f}**" for v in means) + " |")
    return "\n".join(lines)


def resize_shorter_side(rgb: np.ndarray, size: int) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H' x W' float in [0, 1] with the shorter side ``size`` (area
    interpolation when shrinking, cubic when enlarging), as training rescales photos."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return array_to_tensor(cv2.resize(np.ascontiguousarray(rgb), new, interpolation=interpolation))


def held_out_photos(size: int = 256) -> Dict[str, torch.Tensor]:
    """The photos the demo checkpoint was not trained on: scikit-image's astronaut (public
    domain, NASA) and scikit-learn's china.jpg and flower.jpg (CC BY 2.0, by danielbuechele
    and vultilion on Flickr), shorter side ``size``."""
    import skimage.data
    try:
        from sklearn.datasets import load_sample_image
    except ImportError as exc:
        raise ImportError("the held-out photos china.jpg and flower.jpg ship with scikit-learn: "
                          "pip install scikit-learn") from exc
    photos = {"astronaut": skimage.data.astronaut()}
    photos.update({name: load_sample_image(f"{name}.jpg") for name in ("china", "flower")})
    return {name: resize_shorter_side(rgb, size) for name, rgb in photos.items()}
