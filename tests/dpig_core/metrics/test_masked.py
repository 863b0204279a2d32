from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from dpig_core.metrics.masked import default_radius, mask_ssim, person_masks
from dpig_core.pose import limb_mask

H, W = 128, 64

# A standing person at 128×64, (row, col) per COCO-18 keypoint, all visible.
_STANDING = [
    (14, 32), (26, 32), (27, 22), (44, 19), (60, 17), (27, 42), (44, 45), (60, 47), (64, 26),
    (88, 25), (112, 24), (64, 38), (88, 39), (112, 40), (11, 29), (11, 35), (13, 26), (13, 38),
]  # fmt: skip


def _rcv(shift: float = 0.0) -> np.ndarray:
    rc = np.array(_STANDING, dtype=np.float32) + np.float32(shift)
    return np.concatenate([rc, np.ones((18, 1), np.float32)], axis=1)


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-70, 71, a.shape), 0, 255).astype(np.uint8)
    return a, b


def _t(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double()


def _masked(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # DPIG score_mask.py: multiply by the {0, 1} mask, cast to uint8.
    return (img * mask[..., None]).astype(np.uint8)


def test_default_radius_follows_patn_rule() -> None:
    assert default_radius(128) == 4
    assert default_radius(256) == 8
    assert default_radius(16) == 1
    assert default_radius(8) == 1


def test_person_masks_shape_values_and_limb_mask_parity() -> None:
    rcv = np.stack([_rcv(), _rcv(3.0)])
    masks = person_masks(rcv, H, W)
    assert masks.shape == (2, 1, H, W)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    for i in range(2):
        expected = limb_mask(rcv[i], H, W, 4)
        np.testing.assert_array_equal(masks[i, 0].numpy(), expected.astype(np.float32))
    np.testing.assert_array_equal(person_masks(torch.from_numpy(rcv), H, W).numpy(), masks.numpy())
    wider = person_masks(rcv[:1], H, W, radius=7)
    assert wider.sum() > masks[0].sum()


def test_person_masks_of_invisible_pose_is_empty_and_bad_shape_raises() -> None:
    assert person_masks(np.zeros((1, 18, 3), np.float32), H, W).sum() == 0
    with pytest.raises(ValueError, match=r"\[B, 18, 3\]"):
        person_masks(np.zeros((18, 3), np.float32), H, W)


@pytest.mark.parametrize("seed", [0, 1])
def test_dpig_variant_matches_skimage_rgb_window7(seed: int) -> None:
    gen, target = _pair(seed)
    mask = limb_mask(_rcv(), H, W, 7)
    expected = structural_similarity(_masked(gen, mask), _masked(target, mask), channel_axis=2,
                                     win_size=7, data_range=255)  # fmt: skip
    masks = torch.from_numpy(mask.astype(np.float32))[None, None]
    got = mask_ssim(_t(gen), _t(target), masks, variant="dpig")
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [2, 3])
def test_patn_variant_matches_skimage_gaussian(seed: int) -> None:
    gen, target = _pair(seed)
    mask = limb_mask(_rcv(), H, W, 4)
    g, t = _masked(gen, mask).astype(np.float64), _masked(target, mask).astype(np.float64)
    expected = structural_similarity(
        g, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2,
        data_range=g.max() - g.min(),
    )  # fmt: skip
    masks = person_masks(_rcv()[None], H, W)
    got = mask_ssim(_t(gen), _t(target), masks, variant="patn")
    assert got.item() == pytest.approx(expected, abs=1e-9)


def test_batch_is_per_image() -> None:
    (g0, t0), (g1, t1) = _pair(4), _pair(5)
    masks = person_masks(np.stack([_rcv(), _rcv(2.0)]), H, W)
    batch = mask_ssim(_t(g0, g1), _t(t0, t1), masks)
    assert batch.shape == (2,)
    single = [
        mask_ssim(_t(g), _t(t), masks[i : i + 1]) for i, (g, t) in enumerate([(g0, t0), (g1, t1)])
    ]
    assert batch.tolist() == pytest.approx([s.item() for s in single], abs=1e-12)


@pytest.mark.parametrize("variant", ["dpig", "patn"])
def test_identical_images_score_one(variant: str) -> None:
    gen, _ = _pair(6)
    masks = person_masks(_rcv()[None], H, W)
    assert mask_ssim(_t(gen), _t(gen), masks, variant=variant).item() == pytest.approx(1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["dpig", "patn"])
def test_empty_mask_scores_one(variant: str) -> None:
    gen, target = _pair(7)
    masks = torch.zeros(1, 1, H, W)
    assert mask_ssim(_t(gen), _t(target), masks, variant=variant).item() == 1.0  # type: ignore[arg-type]


def test_unknown_variant_and_shape_mismatch_raise() -> None:
    gen, target = _pair(8)
    masks = torch.ones(1, 1, H, W)
    with pytest.raises(ValueError, match="variant"):
        mask_ssim(_t(gen), _t(target), masks, variant="gfla")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes differ"):
        mask_ssim(_t(gen), _t(target)[..., :32], masks)
