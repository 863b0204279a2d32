from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from dpig_core.metrics.ssim import l1, psnr, ssim, ssim_dpig, ssim_gfla, ssim_patn


def _pair(seed: int, h: int = 64, w: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    noise = rng.integers(-60, 61, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    return a, b


def _t(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_dpig_variant_matches_skimage_grayscale_window7(seed: int) -> None:
    gen, target = _pair(seed)
    g, t = rgb2gray(gen), rgb2gray(target)
    expected = structural_similarity(g, t, win_size=7, data_range=t.max() - t.min())
    assert ssim_dpig(_t(gen), _t(target)).item() == pytest.approx(expected, abs=1e-9)


def test_patn_variant_matches_skimage_gaussian_rgb() -> None:
    gen, target = _pair(2)
    expected = structural_similarity(
        gen.astype(np.float64), target.astype(np.float64), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, channel_axis=2, data_range=float(gen.max()) - gen.min(),
    )  # fmt: skip
    assert ssim_patn(_t(gen), _t(target)).item() == pytest.approx(expected, abs=1e-9)


def test_gfla_variant_matches_skimage_window51() -> None:
    gen, target = _pair(3, 128, 64)
    expected = structural_similarity(gen / 255.0, target / 255.0, win_size=51, data_range=1,
                                     channel_axis=2)  # fmt: skip
    assert ssim_gfla(_t(gen), _t(target)).item() == pytest.approx(expected, abs=1e-9)


def test_batches_are_per_image() -> None:
    (a, b), (c, d) = _pair(4), _pair(5)
    both = ssim_dpig(_t(a, c), _t(b, d))
    assert both[0].item() == pytest.approx(ssim_dpig(_t(a), _t(b)).item())
    assert both[1].item() == pytest.approx(ssim_dpig(_t(c), _t(d)).item())


def test_identical_images_score_one_and_window_too_large_is_an_error() -> None:
    a, _ = _pair(6)
    assert ssim_patn(_t(a), _t(a)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="larger than"):
        ssim(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5), 1.0, win_size=7)


def test_psnr_and_l1_values() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 10, np.uint8)
    assert psnr(_t(a), _t(b)).item() == pytest.approx(10 * np.log10(255**2 / 100))
    assert l1(_t(a), _t(b)).item() == pytest.approx(10 / 255)
