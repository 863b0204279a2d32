"""dpig_core.models.encoder: Market fg/bg encoder, DeepFashion appearance encoder (§3.1, §6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpig_core.config import PRESETS, DPIGConfig
from dpig_core.models.encoder import AppEncoder, FgBgEncoder, build_encoder

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"]
TINY_APP = TINY.with_changes(encoder="app", roi_style="deepfashion")


def inputs(config: DPIGConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """image, mask (a centred rectangle), 7 boxes inside the frame, vis all 1."""
    gen = torch.Generator().manual_seed(seed)
    h, w = config.height, config.width
    image = torch.rand(batch, 3, h, w, generator=gen) * 2 - 1
    mask = torch.zeros(batch, 1, h, w)
    mask[:, :, h // 8 : h - h // 8, w // 4 : w - w // 4] = 1
    boxes = torch.tensor(
        [[2, 3, 12, 12], [8, 2, 20, 14], [16, 3, 30, 13], [6, 9, 18, 15], [6, 0, 18, 7],
         [18, 8, 31, 15], [18, 0, 31, 8]],
        dtype=torch.float32,
    ).expand(batch, -1, -1)  # fmt: skip
    return image, mask, boxes, torch.ones(batch, 7)


def test_fgbg_forward_shape_and_layout() -> None:
    torch.manual_seed(0)
    enc = build_encoder(TINY)
    assert isinstance(enc, FgBgEncoder)
    out = enc(*inputs(TINY))
    assert out.shape == (2, 7 * 4 + 8) == (2, TINY.embedding_dim)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out[:, :28] != 0).any(dim=1).all() and (out[:, 28:] != 0).any(dim=1).all()


def test_invisible_parts_are_zero_vectors() -> None:
    torch.manual_seed(0)
    enc = FgBgEncoder(TINY)
    image, mask, boxes, vis = inputs(TINY)
    full = enc(image, mask, boxes, vis)
    vis = vis.clone()
    vis[0, 3] = 0  # left arm of image 0
    vis[1, 0] = 0  # head of image 1
    gated = enc(image, mask, boxes, vis)
    assert gated[0, 12:16].abs().max() == 0 and gated[1, 0:4].abs().max() == 0
    assert (full[0, 12:16] != 0).any() and (full[1, 0:4] != 0).any()
    keep = torch.ones_like(gated, dtype=torch.bool)
    keep[0, 12:16] = False
    keep[1, 0:4] = False
    torch.testing.assert_close(gated[keep], full[keep], atol=1e-6, rtol=0)


def test_mask_splits_features_between_fg_and_bg() -> None:
    # Zero biases at init: a branch fed all-zero features outputs exactly zero.
    torch.manual_seed(0)
    enc = FgBgEncoder(TINY)
    image, mask, boxes, vis = inputs(TINY)
    no_fg = enc(image, torch.zeros_like(mask), boxes, vis)
    assert no_fg[:, :28].abs().max() == 0 and (no_fg[:, 28:] != 0).any()
    no_bg = enc(image, torch.ones_like(mask), boxes, vis)
    assert no_bg[:, 28:].abs().max() == 0 and (no_bg[:, :28] != 0).any()
    with pytest.raises(ValueError, match="limb mask"):
        enc(image, None, boxes, vis)


def test_rois_share_one_tower() -> None:
    # Swapping two boxes (and their vis) swaps the two 4-d codes: one tower for every ROI.
    torch.manual_seed(0)
    enc = FgBgEncoder(TINY)
    image, mask, boxes, vis = inputs(TINY)
    out = enc(image, mask, boxes, vis)
    perm = [4, 1, 2, 3, 0, 5, 6]
    swapped = enc(image, mask, boxes[:, perm], vis[:, perm])
    codes, codes_swapped = out[:, :28].view(2, 7, 4), swapped[:, :28].view(2, 7, 4)
    torch.testing.assert_close(codes_swapped, codes[:, perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(swapped[:, 28:], out[:, 28:], atol=1e-6, rtol=0)


def test_items_of_a_batch_are_independent() -> None:
    torch.manual_seed(0)
    enc = FgBgEncoder(TINY)
    image, mask, boxes, vis = inputs(TINY)
    both = enc(image, mask, boxes, vis)
    one = enc(image[1:], mask[1:], boxes[1:], vis[1:])
    torch.testing.assert_close(both[1:], one, atol=1e-6, rtol=0)


def test_app_encoder_ignores_the_mask() -> None:
    torch.manual_seed(0)
    enc = build_encoder(TINY_APP)
    assert isinstance(enc, AppEncoder) and not hasattr(enc, "bg_tower")
    image, mask, boxes, vis = inputs(TINY_APP)
    out = enc(image, None, boxes, vis)
    assert out.shape == (2, 28) == (2, TINY_APP.embedding_dim)
    assert torch.equal(enc(image, mask, boxes, vis), out)
    vis[0, 6] = 0
    assert enc(image, None, boxes, vis)[0, 24:28].abs().max() == 0


def test_init_is_xavier_with_zero_biases() -> None:
    torch.manual_seed(0)
    enc = FgBgEncoder(TINY)
    for m in enc.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            assert m.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
            assert m.bias.abs().max() == 0


def test_determinism() -> None:
    torch.manual_seed(7)
    a = FgBgEncoder(TINY)
    torch.manual_seed(7)
    b = FgBgEncoder(TINY)
    x = inputs(TINY)
    out = a(*x)
    assert torch.equal(out, b(*x))
    assert torch.equal(out, a(*x))


def test_encoder_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    enc = FgBgEncoder(TINY)
    enc(*inputs(TINY)).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("preset", "dim"), [("market", 352), ("deepfashion", 224)])
def test_full_presets_on_meta(preset: str, dim: int) -> None:
    config = PRESETS[preset]
    with torch.device("meta"):
        enc = build_encoder(config)
        image = torch.zeros(2, 3, config.height, config.width)
        mask = torch.zeros(2, 1, config.height, config.width)
        out = enc(image, mask, torch.zeros(2, 7, 4), torch.ones(2, 7))
    assert out.shape == (2, dim) and out.device.type == "meta"


def test_market_encoder_structure() -> None:
    with torch.device("meta"):
        enc = build_encoder(PRESETS["market"])
    assert isinstance(enc, FgBgEncoder)
    assert enc.roi.roi_size == 48
    assert enc.roi.fc.in_features == 3 * 3 * 640 and enc.roi.fc.out_features == 32
    assert enc.bg_fc.in_features == 8 * 4 * 640 and enc.bg_fc.out_features == 128
    n = sum(p.numel() for p in enc.stem.parameters())
    assert n == (27 * 128 + 128) + 2 * (9 * 128 * 128 + 128)  # 298,752 ≈ 0.30 M (§9)
    assert round(sum(p.numel() for p in enc.roi.parameters()) / 1e6, 1) == 22.3
    bg = sum(p.numel() for p in [*enc.bg_tower.parameters(), *enc.bg_fc.parameters()])
    assert round(bg / 1e6, 1) == 24.7


def test_deepfashion_encoder_structure() -> None:
    with torch.device("meta"):
        enc = build_encoder(PRESETS["deepfashion"])
    assert isinstance(enc, AppEncoder)
    assert enc.roi.roi_size == 64 and len(enc.roi.tower.blocks) == 7
    assert enc.roi.tower.out_channels == 896
    assert enc.roi.fc.in_features == 896 and enc.roi.fc.out_features == 32  # 64 → 1 spatially
