"""dpig_core.models.dpig: every network of a configuration, and one real Stage-I step on `tiny`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpig_core.config import PRESETS
from dpig_core.models import DPIG, AppEncoder, FgBgEncoder
from dpig_core.pose import denormalize_rcv, limb_mask, normalize_rcv, pose_maps, roi_boxes

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"]

# A standing person in the 32×16 tiny frame (row, col).
POSE = {
    0: (3, 8), 1: (7, 8), 2: (7, 5), 3: (11, 4), 4: (15, 3), 5: (7, 11), 6: (11, 12),
    7: (15, 13), 8: (16, 6), 9: (22, 6), 10: (29, 6), 11: (16, 10), 12: (22, 10), 13: (29, 10),
    14: (2, 7), 15: (2, 9), 16: (3, 6), 17: (3, 10),
}  # fmt: skip


def batch(size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the data pipeline hands Stage-I: image, limb mask, 7 boxes, vis, pose maps, RCV."""
    gen = torch.Generator().manual_seed(seed)
    rcv = np.zeros((18, 3), np.float32)
    for k, (r, c) in POSE.items():
        rcv[k] = (r, c, 1)
    h, w = TINY.height, TINY.width
    mask = limb_mask(rcv, h, w, TINY.mask_radius)
    boxes, vis = roi_boxes(rcv, h, w, TINY.roi_padding)
    rcv_t = torch.from_numpy(rcv)[None].repeat(size, 1, 1)
    return {
        "image": torch.rand(size, 3, h, w, generator=gen) * 2 - 1,
        "mask": torch.from_numpy(mask)[None, None].float().repeat(size, 1, 1, 1),
        "boxes": torch.from_numpy(boxes)[None].repeat(size, 1, 1),
        "vis": torch.from_numpy(vis)[None].repeat(size, 1),
        "maps": pose_maps(rcv_t, h, w, TINY.pose_radius),
        "rcv": rcv_t,
    }


def test_container_holds_every_network() -> None:
    torch.manual_seed(0)
    model = DPIG(TINY)
    assert isinstance(model.encoder, FgBgEncoder)
    assert set(model.mappings) == set(model.critics) == {"fg", "bg", "pose"}
    assert {k.split(".", 1)[0] for k in model.state_dict()} == {
        "encoder", "decoder", "discriminator", "pose_ae", "mappings", "critics",
    }  # fmt: skip
    df = DPIG(TINY.with_changes(encoder="app", roi_style="deepfashion"))
    assert isinstance(df.encoder, AppEncoder) and set(df.mappings) == {"fg", "pose"}


def test_stage1_forward_backward_on_tiny() -> None:
    torch.manual_seed(0)
    model = DPIG(TINY)
    b = batch()
    assert b["mask"].sum() > 0 and b["vis"].eq(1).all()
    embedding = model.encoder(b["image"], b["mask"], b["boxes"], b["vis"])
    assert embedding.shape == (2, 36)
    fake = model.decoder(embedding, b["maps"])
    assert fake.shape == b["image"].shape
    # §3.5: generator = BCE(D(x̂), 1) + 20·L1; D = ½[BCE(D(x), 1) + BCE(D(x̂), 0)], separate D calls.
    d_fake = model.discriminator(fake)
    g_loss = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    g_loss = g_loss + 20 * (fake - b["image"]).abs().mean()
    g_loss.backward()
    for name, p in [*model.encoder.named_parameters(), *model.decoder.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    model.zero_grad()
    d_real, d_fake = model.discriminator(b["image"]), model.discriminator(fake.detach())
    d_loss = 0.5 * (
        F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
        + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    )
    d_loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())


def test_sampling_path_on_tiny() -> None:
    # z → Φ → (pose decoder → RCV → maps) → decoder, as the sampling harness does.
    torch.manual_seed(0)
    model = DPIG(TINY).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        fg = model.mappings["fg"](torch.randn(2, 28, generator=gen) * 0.2)
        bg = model.mappings["bg"](torch.randn(2, 8, generator=gen) * 0.2)
        code = model.mappings["pose"](torch.randn(2, 8, generator=gen) * 0.2)
        coords, vis = model.pose_ae.decode(code)
        rcv = denormalize_rcv(coords, vis, TINY.height, TINY.width)
        maps = pose_maps(rcv, TINY.height, TINY.width, TINY.pose_radius)
        out = model.decoder(torch.cat([fg, bg], dim=1), maps)
    assert out.shape == (2, 3, 32, 16) and torch.isfinite(out).all()
    assert ((rcv[..., 0] >= 0) & (rcv[..., 0] <= 31) & (rcv[..., 1] <= 15)).all()


def test_pose_ae_round_trip_of_a_real_pose() -> None:
    torch.manual_seed(0)
    model = DPIG(TINY)
    x = normalize_rcv(batch()["rcv"], TINY.height, TINY.width)
    assert x.shape == (2, 54) and model.pose_ae(x).shape == (2, 54)


def test_same_seed_same_model_and_outputs() -> None:
    torch.manual_seed(11)
    a = DPIG(TINY)
    torch.manual_seed(11)
    b = DPIG(TINY)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = batch()
    ea = a.encoder(x["image"], x["mask"], x["boxes"], x["vis"])
    eb = b.encoder(x["image"], x["mask"], x["boxes"], x["vis"])
    assert torch.equal(ea, eb)
    out = a.decoder(ea, x["maps"])
    assert torch.equal(out, b.decoder(eb, x["maps"]))
    assert torch.equal(out, a.decoder(ea, x["maps"]))  # same input twice: bit-identical


@pytest.mark.parametrize(("preset", "dim", "logits"), [("market", 352, 1), ("deepfashion", 224, 8)])
def test_full_presets_end_to_end_on_meta(preset: str, dim: int, logits: int) -> None:
    config = PRESETS[preset]
    h, w = config.height, config.width
    with torch.device("meta"):
        model = DPIG(config)
        e = model.encoder(torch.zeros(2, 3, h, w), torch.zeros(2, 1, h, w), torch.zeros(2, 7, 4),
                          torch.ones(2, 7))  # fmt: skip
        img = model.decoder(e, torch.zeros(2, 18, h, w))
        d = model.discriminator(img)
    assert e.shape == (2, dim) and img.shape == (2, 3, h, w) and d.shape == (2, logits)
