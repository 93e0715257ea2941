"""FID, KID and the ShapesCLIP score over image sets, with ShapesCLIP's image tower as the feature net.

Inception-v3 features (what FID normally uses) do not ship offline and were made for natural
photos, not 32x32 renders of flat shapes, so the feature network here is ShapesCLIP's image tower: its pooled,
pre-projection features `[N, 128]`, fed to torchmetrics' `FrechetInceptionDistance` and
`KernelInceptionDistance` as a custom feature extractor. Numbers are therefore comparable only
with other numbers computed with the same ShapesCLIP weights (the weights hash is reported).

Images everywhere: `[N, 3, S, S]`, float in [-1, 1] (the library's convention) or uint8 0–255.
FID on too few images is noise, so sets smaller than `MIN_FID_SAMPLES` are refused.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .shapes_clip import ShapesCLIP, clip_score, shipped_model

MIN_FID_SAMPLES = 200  # per set: FID is a covariance estimate, below this it is mostly noise
MIN_KID_SAMPLES = 50  # per set: KID is unbiased but its spread over subsets grows fast below this


class ShapesCLIPFeatures(nn.Module):
    """torchmetrics feature extractor: images `[B, 3, S, S]` -> pooled image-tower features `[B, C]`."""

    def __init__(self, model: ShapesCLIP) -> None:
        super().__init__()
        self.model = model
        self.num_features = model.image_tower.num_features  # read by torchmetrics instead of probing

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(images)


@dataclass(frozen=True)
class DistanceResult:
    """A set-to-set distance with the sample counts it rests on."""

    name: str  # "FID" or "KID"
    value: float  # FID, or KID mean over subsets
    std: float | None  # KID standard deviation over subsets (None for FID)
    n_real: int  # images in the reference set
    n_fake: int  # images in the compared set
    features: str  # feature network, with the ShapesCLIP weights hash

    def __str__(self) -> str:
        spread = f" ± {self.std:.4g}" if self.std is not None else ""
        return f"{self.name} {self.value:.4g}{spread} ({self.n_real} real vs {self.n_fake} generated, {self.features})"


def _feature_name(model: ShapesCLIP) -> str:
    return f"ShapesCLIP@{model.weights_id} pooled image features ({model.image_tower.num_features}-d)"


def _check_sets(real: torch.Tensor, fake: torch.Tensor, minimum: int, what: str) -> None:
    for name, images in (("real", real), ("generated", fake)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"{what}: {name} images must be a tensor [N, 3, S, S]")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(
            f"{what} needs at least {minimum} images per set to mean anything; got {len(real)} real and "
            f"{len(fake)} generated. Generate more samples (or use the ShapesCLIP score, which is per image)."
        )


def _feed(metric, images: torch.Tensor, real: bool, batch_size: int) -> None:
    for i in range(0, len(images), batch_size):
        metric.update(images[i : i + batch_size], real=real)


def fid(
    real: torch.Tensor,
    fake: torch.Tensor,
    model: ShapesCLIP | None = None,
    batch_size: int = 256,
    min_samples: int = MIN_FID_SAMPLES,
) -> DistanceResult:
    """Fréchet distance between ShapesCLIP image features of two image sets `[N, 3, S, S]`.

    Refuses sets with fewer than `min_samples` images (default 200) each. Rounding can push the
    distance of nearly identical sets a hair below 0: it is reported as 0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_sets(real, fake, min_samples, "FID")
    model = model or shipped_model()
    metric = FrechetInceptionDistance(feature=ShapesCLIPFeatures(model))
    _feed(metric, real, True, batch_size)
    _feed(metric, fake, False, batch_size)
    value = float(metric.compute())
    return DistanceResult("FID", max(value, 0.0), None, len(real), len(fake), _feature_name(model))


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    model: ShapesCLIP | None = None,
    subset_size: int | None = None,
    subsets: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    min_samples: int = MIN_KID_SAMPLES,
) -> DistanceResult:
    """Kernel Inception Distance (polynomial-kernel MMD) on ShapesCLIP image features.

    subset_size: images per subset (default min(1000, smallest set)); must not exceed either set.
    seed: seeds the subset draws, so the same sets give the same number.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_sets(real, fake, min_samples, "KID")
    smallest = min(len(real), len(fake))
    subset_size = min(1000, smallest) if subset_size is None else subset_size
    if not 2 <= subset_size <= smallest:
        raise ValueError(f"KID subset_size must lie in [2, {smallest}] (the smaller set's size), got {subset_size}")
    model = model or shipped_model()
    with warnings.catch_warnings():  # "will save all extracted features": 128 floats per image here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=ShapesCLIPFeatures(model), subsets=subsets, subset_size=subset_size)
    _feed(metric, real, True, batch_size)
    _feed(metric, fake, False, batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return DistanceResult("KID", float(mean), float(std), len(real), len(fake), _feature_name(model))


@dataclass(frozen=True)
class ScoreResult:
    """Mean ShapesCLIP score over a set."""

    mean: float  # mean of 100 * max(cosine, 0)
    std: float  # standard deviation over images
    n: int  # image-prompt pairs scored

    def __str__(self) -> str:
        return f"ShapesCLIP score {self.mean:.2f} ± {self.std:.2f} (n={self.n})"


def clip_score_mean(images: torch.Tensor, prompts: Sequence[str], model: ShapesCLIP | None = None) -> ScoreResult:
    """Mean ShapesCLIP score (100 * cosine, clamped at 0) of images `[N, 3, S, S]` with their prompts."""
    if len(prompts) == 0:
        raise ValueError("no image-prompt pairs to score")
    scores = clip_score(images, list(prompts), model=model)
    std = scores.std().item() if len(scores) > 1 else 0.0
    return ScoreResult(scores.mean().item(), std, len(scores))
