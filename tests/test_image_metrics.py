"""FID / KID with ShapesCLIP features and the set-level ShapesCLIP score."""
from __future__ import annotations

import pytest
import torch

from llm4gen_lite.image_metrics import MIN_FID_SAMPLES, ShapesCLIPFeatures, clip_score_mean, fid, kid
from llm4gen_lite.shapes_clip import evaluation_pairs, shipped_model


@pytest.fixture(scope="module")
def renders() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two independent sets of 256 test-iid renders (float in [-1, 1]) and the first set's captions."""
    a, captions = evaluation_pairs("test_iid", 256, seed=0)
    b, _ = evaluation_pairs("test_iid", 256, seed=1)
    return a, b, captions


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_fid_self_zero_renders_small_noise_large(renders, noise) -> None:
    a, b, _ = renders
    same = fid(a, a)
    between = fid(a, b)
    far = fid(a, noise)
    assert same.n_real == same.n_fake == 256 and "ShapesCLIP@" in same.features
    assert same.value < 1e-3 * far.value
    assert far.value > 20 * between.value
    assert "256 real vs 256 generated" in str(far)


def test_kid_self_zero_noise_large(renders, noise) -> None:
    a, b, _ = renders
    same, far = kid(a, a, subset_size=100), kid(a, noise, subset_size=100)
    assert abs(same.value) < 0.01 * far.value and far.std is not None  # unbiased estimate: noise around 0
    assert kid(a, b, subset_size=100).value < 0.1 * far.value
    assert kid(a, b, subset_size=100, seed=3).value == kid(a, b, subset_size=100, seed=3).value


def test_too_few_samples_are_refused(renders) -> None:
    a, _, _ = renders
    with pytest.raises(ValueError, match=f"at least {MIN_FID_SAMPLES} images per set"):
        fid(a, a[:MIN_FID_SAMPLES - 1])
    with pytest.raises(ValueError, match=r"subset_size must lie in \[2, 60\]"):
        kid(a, a[:60], subset_size=100)


def test_uint8_and_float_inputs_give_the_same_features(renders) -> None:
    a, _, _ = renders
    as_uint8 = ((a[:8] + 1) * 127.5).round().to(torch.uint8)
    net = ShapesCLIPFeatures(shipped_model())
    assert net(a[:8]).shape == (8, net.num_features)
    assert torch.allclose(net(a[:8]), net(as_uint8), atol=1e-4)


def test_clip_score_mean(renders) -> None:
    a, _, captions = renders
    result = clip_score_mean(a[:64], captions[:64])
    assert result.n == 64 and 0 < result.mean <= 100
    mismatched = clip_score_mean(a[:64], captions[1:65])
    assert result.mean > mismatched.mean
