from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpig_core.metrics.fid import (
    FIDWeightsError,
    InceptionFeatures,
    Statistics,
    frechet_distance,
    nv_bilinear_resize,
)


def _has_fid_weights() -> bool:
    from dpig_core.metrics.fid import default_weights_path

    try:
        return default_weights_path().is_file()
    except (FIDWeightsError, ImportError, OSError):
        return False


def _stats(seed: int, shift: float = 0.0, n: int = 400, d: int = 6) -> Statistics:
    feats = np.random.default_rng(seed).normal(size=(n, d)) + shift
    return Statistics(feats.mean(axis=0), np.cov(feats, rowvar=False), n)


def test_frechet_distance_of_identical_statistics_is_zero() -> None:
    s = _stats(0)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_mean_shift_is_its_squared_norm() -> None:
    a = _stats(1)
    b = Statistics(a.mu + 2.0, a.sigma, a.count)
    assert frechet_distance(a, b) == pytest.approx(4.0 * len(a.mu), rel=1e-6)


def test_statistics_round_trip_with_metadata(tmp_path: Path) -> None:
    s = _stats(2)
    s.meta = {"images": "real A", "resize": "nv_bilinear"}
    s.save(tmp_path / "stats.npz")
    back = Statistics.load(tmp_path / "stats.npz")
    assert np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)
    assert back.count == s.count and back.meta == s.meta


def test_resize_keeps_a_constant_image_constant() -> None:
    x = torch.full((1, 3, 64, 32), 0.25)
    y = nv_bilinear_resize(x)
    assert y.shape == (1, 3, 299, 299)
    assert torch.allclose(y, x.new_full(y.shape, 0.25))


def test_wrong_weights_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not inception")
    with pytest.raises(FIDWeightsError, match="SHA-256"):
        InceptionFeatures(fake)
    with pytest.raises(FIDWeightsError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pt")


def test_fid_of_an_image_set_against_itself_is_about_zero() -> None:
    """Through `statistics` (features → mean and covariance → sqrtm), not just equal inputs."""
    from dpig_core.metrics.fid import statistics

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 32, 5, stride=4)

    def features(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return conv(images / 255).mean(dim=(2, 3)).double().numpy()

    images = torch.randint(0, 256, (300, 3, 32, 16)).float()
    a = statistics(iter(images.split(100)), features)  # type: ignore[arg-type]
    b = statistics(iter(images.flip(0).split(50)), features)  # type: ignore[arg-type]
    assert frechet_distance(a, b) == pytest.approx(0.0, abs=1e-6)
    other = statistics(iter((images * 0.5).split(100)), features)  # type: ignore[arg-type]
    assert frechet_distance(a, other) > 1e-3


@pytest.mark.skipif(not _has_fid_weights(), reason="metrics extra not installed")
def test_real_inception_fid_of_a_set_against_itself_is_about_zero() -> None:
    from dpig_core.metrics.fid import statistics

    images = torch.randint(0, 256, (16, 3, 64, 32), generator=torch.Generator().manual_seed(1))
    s = statistics(iter([images.float()]), InceptionFeatures())
    assert abs(frechet_distance(s, s)) < 1e-3
