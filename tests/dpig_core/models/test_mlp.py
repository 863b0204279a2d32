"""dpig_core.models.mlp: mappings Φ (`GaussianFCRes`) and WGAN critics (`FCDiscriminator`) (§5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpig_core.config import PRESETS
from dpig_core.models import DPIG, factor_dims
from dpig_core.models.mlp import Critic, Mapping, ResidualMLP

pytestmark = pytest.mark.usefixtures("single_thread")


def z(batch: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)) * 0.2


def test_mapping_shapes() -> None:
    torch.manual_seed(0)
    phi = Mapping(24, 16, blocks=2)
    assert phi.dim == 24 and len(phi.blocks) == 2
    assert phi(z(5, 24)).shape == (5, 24)


def test_mapping_written_out() -> None:
    # FC d→h + LReLU(0.2); blocks x + LReLU(fc2(LReLU(fc1 x))); FC h→d, linear.
    torch.manual_seed(0)
    phi = Mapping(6, 10, blocks=3)
    with torch.no_grad():
        for p in phi.parameters():
            p.uniform_(-0.5, 0.5)  # non-zero biases too
    x = z(4, 6)
    h = F.leaky_relu(x @ phi.fc_in.weight.T + phi.fc_in.bias, 0.2)
    for block in phi.blocks:
        inner = F.leaky_relu(h @ block.fc1.weight.T + block.fc1.bias, 0.2)
        h = h + F.leaky_relu(inner @ block.fc2.weight.T + block.fc2.bias, 0.2)
    ref = h @ phi.fc_out.weight.T + phi.fc_out.bias
    torch.testing.assert_close(phi(x), ref, atol=1e-6, rtol=1e-6)


def test_mapping_blocks_are_residual() -> None:
    # With the second FC of each block zeroed, every block is the identity.
    torch.manual_seed(0)
    phi = Mapping(6, 10, blocks=3)
    with torch.no_grad():
        for block in phi.blocks:
            block.fc2.weight.zero_()
            block.fc2.bias.zero_()
    x = z(4, 6)
    ref = phi.fc_out(F.leaky_relu(phi.fc_in(x), 0.2))
    torch.testing.assert_close(phi(x), ref)


def test_residual_mlp_without_head() -> None:
    torch.manual_seed(0)
    trunk = ResidualMLP(5, 7, None, 1, linear_in=True)
    assert trunk.fc_out is None
    assert trunk(torch.randn(2, 5)).shape == (2, 7)


def test_mapping_init_is_xavier_with_zero_biases() -> None:
    torch.manual_seed(0)
    phi = Mapping(224, 512, blocks=4)
    for layer in [phi.fc_in, phi.fc_out, *(fc for b in phi.blocks for fc in (b.fc1, b.fc2))]:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound
        assert layer.bias.abs().max() == 0


def test_critic_shapes_and_layers() -> None:
    torch.manual_seed(0)
    critic = Critic(24, hidden=16, layers=3)
    assert critic(z(5, 24)).shape == (5, 1)
    # FC d→h, then 3 × FC h→h, then FC h→1.
    assert [(layer.in_features, layer.out_features) for layer in critic.hidden] == [
        (24, 16), (16, 16), (16, 16), (16, 16),
    ]  # fmt: skip
    assert (critic.out.in_features, critic.out.out_features) == (16, 1)


def test_critic_written_out() -> None:
    torch.manual_seed(0)
    critic = Critic(6, hidden=8, layers=2)
    x = z(3, 6)
    h = x
    for layer in critic.hidden:
        h = F.leaky_relu(h @ layer.weight.T + layer.bias, 0.2)
    ref = h @ critic.out.weight.T + critic.out.bias
    torch.testing.assert_close(critic(x), ref, atol=1e-6, rtol=1e-6)


def test_critic_init_he_hidden_glorot_output() -> None:
    torch.manual_seed(0)
    critic = Critic(224, hidden=512, layers=3)  # the Market fg critic
    for layer in critic.hidden:
        bound = math.sqrt(6 / layer.in_features)  # "he": std √(2/fan_in), uniform ±std·√3
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound
        std = math.sqrt(2 / layer.in_features)
        assert abs(layer.weight.std().item() - std) < 0.02 * std
        assert layer.bias.abs().max() == 0
    bound = math.sqrt(6 / (512 + 1))  # Glorot uniform
    assert critic.out.weight.abs().max() <= bound and critic.out.weight.abs().max() > 0.8 * bound
    assert critic.out.bias.abs().max() == 0


def test_factor_dims() -> None:
    assert factor_dims(PRESETS["market"]) == {"fg": (224, 512), "bg": (128, 256), "pose": (32, 512)}
    assert factor_dims(PRESETS["deepfashion"]) == {"fg": (224, 512), "pose": (32, 512)}


def test_market_mapping_and_critic_parameter_counts() -> None:
    with torch.device("meta"):
        model = DPIG(PRESETS["market"])
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in [
            *model.mappings.items(),
            *(("c_" + k, v) for k, v in model.critics.items()),
        ]
    }

    def phi(d: int, h: int) -> int:
        return (d * h + h) + 8 * (h * h + h) + (h * d + d)

    def critic(d: int) -> int:
        return (d * 512 + 512) + 3 * (512 * 512 + 512) + 513

    # Φ: 2,331,360 / 592,256 / 2,134,560; critics: 903,681 / 854,529 / 805,377.
    assert counts == {
        "fg": phi(224, 512), "bg": phi(128, 256), "pose": phi(32, 512),
        "c_fg": critic(224), "c_bg": critic(128), "c_pose": critic(32),
    }  # fmt: skip
    with torch.device("meta"):
        for k, (d, _) in factor_dims(PRESETS["market"]).items():
            assert model.mappings[k](torch.zeros(3, d)).shape == (3, d)
            assert model.critics[k](torch.zeros(3, d)).shape == (3, 1)


def test_determinism_and_backward() -> None:
    torch.manual_seed(2)
    a, ca = Mapping(8, 16, 2), Critic(8, 16, 2)
    torch.manual_seed(2)
    b, cb = Mapping(8, 16, 2), Critic(8, 16, 2)
    x = z(4, 8)
    assert torch.equal(a(x), b(x)) and torch.equal(ca(x), cb(x)) and torch.equal(a(x), a(x))
    (-ca(a(x)).mean()).backward()  # L_Φ = −mean D(Φ(z))
    for name, p in [*a.named_parameters(), *ca.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
