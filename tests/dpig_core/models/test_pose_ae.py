"""dpig_core.models.pose_ae: the fully connected pose auto-encoder (§4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpig_core.config import PRESETS
from dpig_core.models.pose_ae import PoseAE, PoseDecoder, straight_through_round
from dpig_core.pose import normalize_rcv

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"]  # pose_dim 8, pose_hidden 16, mlp_blocks 2


def normalized_poses(batch: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rcv = torch.zeros(batch, 18, 3)
    rcv[..., 0] = torch.randint(0, 128, (batch, 18), generator=gen).float()
    rcv[..., 1] = torch.randint(0, 64, (batch, 18), generator=gen).float()
    rcv[..., 2] = (torch.rand(batch, 18, generator=gen) > 0.2).float()
    return normalize_rcv(rcv, 128, 64)


def test_straight_through_round_forward_and_gradient() -> None:
    x = torch.tensor([0.2, 0.49, 0.51, 0.8, 0.0, 1.0, 0.999], requires_grad=True)
    out = straight_through_round(x)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # exact 0/1, not x ± ε
    weights = torch.arange(1.0, 8.0)
    (out * weights).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, weights)  # identity gradient


def test_decoder_visibility_is_binary_with_sigmoid_gradient() -> None:
    torch.manual_seed(0)
    dec = PoseDecoder(8, 16, 2)
    code = torch.randn(5, 8)
    coords, vis = dec(code)
    assert coords.shape == (5, 18, 2) and vis.shape == (5, 18)
    assert set(vis.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(vis, torch.round(torch.sigmoid(dec.vis(dec.trunk(code)))))
    # Gradient of the rounded visibility = gradient of the sigmoid itself (straight-through).
    w = torch.randn(5, 18)
    (vis * w).sum().backward()
    st_grad = dec.vis.weight.grad.clone()
    dec.zero_grad()
    (torch.sigmoid(dec.vis(dec.trunk(code))) * w).sum().backward()
    torch.testing.assert_close(st_grad, dec.vis.weight.grad)
    assert st_grad.abs().sum() > 0


def test_decoder_trunk_starts_linear() -> None:
    # PoseDecoderFCRes: FC 32 → 512 with no activation. Zero the residual branches: trunk = fc_in.
    torch.manual_seed(0)
    dec = PoseDecoder(8, 16, 2)
    with torch.no_grad():
        for block in dec.trunk.blocks:
            block.fc2.weight.zero_()
            block.fc2.bias.zero_()
    code = torch.randn(4, 8)
    torch.testing.assert_close(dec.trunk.trunk(code), dec.trunk.fc_in(code))
    assert (dec.trunk.trunk(code) < 0).any()


def test_encoder_starts_with_leaky_relu() -> None:
    torch.manual_seed(0)
    ae = PoseAE(TINY)
    with torch.no_grad():
        for block in ae.encoder.blocks:
            block.fc2.weight.zero_()
            block.fc2.bias.zero_()
    x = normalized_poses()
    h = ae.encoder.fc_in(x)
    torch.testing.assert_close(ae.encoder.trunk(x), F.leaky_relu(h, 0.2))
    torch.testing.assert_close(ae.encode(x), ae.encoder.fc_out(F.leaky_relu(h, 0.2)))


def test_output_layout_is_interleaved() -> None:
    torch.manual_seed(0)
    ae = PoseAE(TINY)
    x = normalized_poses()
    code = ae.encode(x)
    assert code.shape == (3, TINY.pose_dim)
    coords, vis = ae.decode(code)
    out = ae(x)
    assert out.shape == (3, 54)
    torch.testing.assert_close(out[:, 0::3], coords[..., 0])  # r0, r1, …
    torch.testing.assert_close(out[:, 1::3], coords[..., 1])  # c0, c1, …
    torch.testing.assert_close(out[:, 2::3], vis)  # v0, v1, …
    assert set(out[:, 2::3].unique().tolist()) <= {0.0, 1.0}


def test_reconstruction_loss_backward() -> None:
    # §4: 20 · MSE between the 54 normalised inputs and [coords | rounded vis].
    torch.manual_seed(0)
    ae = PoseAE(TINY)
    x = normalized_poses()
    loss = 20 * F.mse_loss(ae(x), x)
    loss.backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_determinism() -> None:
    torch.manual_seed(1)
    a = PoseAE(TINY)
    torch.manual_seed(1)
    b = PoseAE(TINY)
    x = normalized_poses()
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))


@pytest.mark.parametrize("preset", ["market", "deepfashion"])
def test_full_size_parameter_counts(preset: str) -> None:
    with torch.device("meta"):
        ae = PoseAE(PRESETS[preset])
        assert ae.encode(torch.zeros(2, 54)).shape == (2, 32)
        coords, vis = ae.decode(torch.zeros(2, 32))
    assert coords.shape == (2, 18, 2) and vis.shape == (2, 18)
    fc = 512 * 512 + 512
    enc = (54 * 512 + 512) + 8 * fc + (512 * 32 + 32)  # 2,145,824
    dec = (32 * 512 + 512) + 8 * fc + (512 * 36 + 36) + (512 * 18 + 18)  # 2,145,846
    assert sum(p.numel() for p in ae.encoder.parameters()) == enc
    assert sum(p.numel() for p in ae.decoder.parameters()) == dec
    assert np.round(enc / 1e6, 2) == np.round(dec / 1e6, 2) == 2.15
