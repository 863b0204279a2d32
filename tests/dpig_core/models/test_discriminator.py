"""dpig_core.models.discriminator: tflib DCGAN discriminator (§3.4, §6, §11.11–§11.12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpig_core.config import PRESETS
from dpig_core.models.discriminator import DCGANDiscriminator

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"]  # disc_dim 8 → 2·1·64 = 128 features
BOUND = 0.02 * math.sqrt(3)


def images(batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, TINY.height, TINY.width, generator=gen) * 2 - 1


def reference_features(disc: DCGANDiscriminator, x: torch.Tensor) -> torch.Tensor:
    """The forward written out: LReLU(0.2); batch-stats BN (eps 1e-5) after the last 3 convs."""
    x = F.leaky_relu(disc.convs[0](x), 0.2)
    for conv, norm in zip(disc.convs[1:], disc.norms, strict=True):
        y = conv(x)
        mean = y.mean(dim=(0, 2, 3), keepdim=True)
        var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        y = (y - mean) / torch.sqrt(var + 1e-5) * norm.weight[:, None, None] + norm.bias[
            :, None, None
        ]
        x = F.leaky_relu(y, 0.2)
    return x.flatten(1)


def test_one_logit_per_image_for_tiny() -> None:
    torch.manual_seed(0)
    disc = DCGANDiscriminator(TINY)
    out = disc(images(4))
    assert out.shape == (4, 1)
    assert [c.kernel_size for c in disc.convs] == [(5, 5)] * 4
    assert [c.stride for c in disc.convs] == [(2, 2)] * 4
    assert [c.out_channels for c in disc.convs] == [8, 16, 32, 64]
    assert disc.fc.in_features == TINY.disc_features == 128


def test_forward_matches_written_out_reference() -> None:
    torch.manual_seed(0)
    disc = DCGANDiscriminator(TINY)
    with torch.no_grad():  # non-trivial BN affine parameters
        for norm in disc.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = images(3)
    feats = reference_features(disc, x)
    ref = feats @ disc.fc.weight.T + disc.fc.bias
    torch.testing.assert_close(disc(x), ref, atol=1e-5, rtol=1e-5)


def test_batchnorm_always_uses_batch_statistics() -> None:
    torch.manual_seed(0)
    disc = DCGANDiscriminator(TINY)
    for norm in disc.norms:
        assert norm.track_running_stats is False and norm.running_mean is None
        assert norm.eps == 1e-5 and norm.affine
    x = images(4)
    disc.train()
    train_out = disc(x)
    disc.eval()
    eval_out = disc(x)
    assert torch.equal(train_out, eval_out)
    # ... so an image's logit depends on the rest of its batch.
    other = disc(torch.cat([x[:1], images(3, seed=1)]))
    assert (other[0] - eval_out[0]).abs().max() > 1e-4
    # Separate calls (model 1: real and fake apart) differ from one joint call (DF).
    joint = disc(torch.cat([x[:2], x[2:]]))
    apart = torch.cat([disc(x[:2]), disc(x[2:])])
    assert torch.equal(joint, train_out) and (joint - apart).abs().max() > 1e-4


def test_multi_logit_rows() -> None:
    torch.manual_seed(0)
    config = TINY.with_changes(disc_logit_width=32)
    disc = DCGANDiscriminator(config)
    assert disc.fc.in_features == 32 and disc.logit_width == 32
    x = images(3)
    out = disc(x)
    assert out.shape == (3, 128 // 32)
    # Row j of image b is features[b, 32j : 32(j+1)] (flattened NCHW: 16 channels × 2 × 1 each).
    feats = reference_features(disc, x).view(3, 4, 32)
    ref = feats @ disc.fc.weight[0] + disc.fc.bias[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert DCGANDiscriminator(TINY.with_changes(disc_logit_width=128))(x).shape == (3, 1)
    with pytest.raises(ValueError, match="disc_logit_width 48 must be a positive divisor"):
        TINY.with_changes(disc_logit_width=48)


def test_init_bounds_and_zero_biases() -> None:
    torch.manual_seed(0)
    disc = DCGANDiscriminator(TINY)
    for layer in [*disc.convs, disc.fc]:
        assert layer.weight.abs().max() <= BOUND
        assert layer.bias.abs().max() == 0
    for norm in disc.norms:
        assert norm.weight.eq(1).all() and norm.bias.eq(0).all()


def test_market_init_statistics() -> None:
    torch.manual_seed(0)
    disc = DCGANDiscriminator(PRESETS["market"])  # 4.3 M parameters, built for real
    w = disc.convs[3].weight  # 256 → 512, 5×5: 3.3 M values
    assert w.abs().max() <= BOUND and w.abs().max() > 0.999 * BOUND
    assert abs(w.std().item() - 0.02) < 1e-4 and abs(w.mean().item()) < 1e-4
    assert disc.fc.weight.abs().max() <= BOUND and disc.fc.in_features == 16384
    assert sum(p.numel() for p in disc.parameters()) == 4324737


@pytest.mark.parametrize(
    ("preset", "logits", "width"), [("market", 1, 16384), ("deepfashion", 8, 16384)]
)
def test_full_presets_on_meta(preset: str, logits: int, width: int) -> None:
    config = PRESETS[preset]
    with torch.device("meta"):
        disc = DCGANDiscriminator(config)
        out = disc(torch.zeros(2, 3, config.height, config.width))
    assert out.shape == (2, logits) and disc.fc.in_features == width


def test_determinism_and_backward() -> None:
    torch.manual_seed(5)
    a = DCGANDiscriminator(TINY)
    torch.manual_seed(5)
    b = DCGANDiscriminator(TINY)
    x = images(2).requires_grad_()
    out = a(x)
    assert torch.equal(out, b(x)) and torch.equal(out, a(x))
    F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in a.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
