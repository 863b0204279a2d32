"""dpig_core.model_info: parameter and MAC counts, pinned to the numbers of spec §9.

Each count is checked twice: exactly, against the per-layer arithmetic of §9 written out below
(conv params k²·Cin·Cout + Cout, conv MACs Hout·Wout·k²·Cin·Cout, FC MACs in·out), and at the
precision the spec prints.
"""

from __future__ import annotations

from typing import Any

import pytest

from dpig_core.config import PRESETS, DPIGConfig
from dpig_core.model_info import model_info

pytestmark = pytest.mark.usefixtures("single_thread")


def conv(k: int, cin: int, cout: int, h: int, w: int) -> tuple[int, int]:
    """(params, MACs) of a k×k conv with output size h×w."""
    return k * k * cin * cout + cout, h * w * k * k * cin * cout


def fc(cin: int, cout: int) -> tuple[int, int]:
    return cin * cout + cout, cin * cout


def total(layers: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(p for p, _ in layers), sum(m for _, m in layers)


def tower(n: int, depth: int, h: int, w: int) -> list[tuple[int, int]]:
    layers = []
    for i in range(depth):
        c, s = n * (i + 1), 2**i
        layers += [conv(3, c, c, h // s, w // s)] * 2
        if i < depth - 1:
            layers.append(conv(3, c, n * (i + 2), h // (2 * s), w // (2 * s)))
    return layers


def decoder_layers(c: DPIGConfig) -> list[tuple[int, int]]:
    n, depth, h, w = c.hidden, c.decoder_depth, c.height, c.width
    bh, bw = h // 2 ** (depth - 1), w // 2 ** (depth - 1)
    layers = [conv(3, c.embedding_dim + 18, n, h, w), *tower(n, depth, h, w)]
    layers += [fc(bh * bw * n * depth, c.bottleneck_dim), fc(c.bottleneck_dim, bh * bw * n)]
    channels = n
    for j in range(depth):
        channels += n * (depth - j)
        s = 2**j
        layers += [conv(3, channels, channels, bh * s, bw * s)] * 2
        if j < depth - 1:
            layers.append(conv(1, channels, n * (depth - 1 - j), bh * 2 * s, bw * 2 * s))
            channels = n * (depth - 1 - j)
    layers.append(conv(3, channels, 3, h, w))
    return layers


def encoder_layers(c: DPIGConfig) -> list[tuple[int, int]]:
    n, h, w = c.hidden, c.height, c.width
    layers = [conv(3, 3, n, h, w), conv(3, n, n, h, w), conv(3, n, n, h, w)]  # stem
    side = c.roi_size // 2 ** (c.roi_depth - 1)
    roi = [*tower(n, c.roi_depth, c.roi_size, c.roi_size), fc(side * side * n * c.roi_depth, 32)]
    layers += [(p, 7 * m) for p, m in roi]  # shared weights, run on 7 crops
    if c.has_bg:
        d = 2 ** (c.bg_depth - 1)
        layers += [*tower(n, c.bg_depth, h, w), fc((h // d) * (w // d) * n * c.bg_depth, 128)]
    return layers


def discriminator_layers(c: DPIGConfig) -> list[tuple[int, int]]:
    dims, h, w = [3, 64, 128, 256, 512], c.height, c.width
    layers = [conv(5, dims[i], dims[i + 1], h // 2 ** (i + 1), w // 2 ** (i + 1)) for i in range(4)]
    layers += [(2 * ch, 0) for ch in dims[2:]]  # BatchNorm scale and offset
    rows = c.disc_features // c.disc_logit_width
    p, m = fc(c.disc_logit_width, 1)
    return [*layers, (p, rows * m)]


@pytest.fixture(scope="module")
def market() -> dict[str, Any]:
    return model_info(PRESETS["market"])


@pytest.fixture(scope="module")
def deepfashion() -> dict[str, Any]:
    return model_info(PRESETS["deepfashion"])


def params_m(net: dict[str, int], digits: int) -> float:
    return round(net["params"] / 1e6, digits)


def gmac(net: dict[str, int], digits: int) -> float:
    return round(net["macs"] / 1e9, digits)


# --------------------------------------------------------------------------------------------------
# Exact, from the per-layer arithmetic


@pytest.mark.parametrize("preset", ["market", "deepfashion"])
def test_counts_match_per_layer_arithmetic(preset: str, request: pytest.FixtureRequest) -> None:
    info = request.getfixturevalue(preset)
    config = PRESETS[preset]
    nets = info["networks"]
    assert (nets["decoder"]["params"], nets["decoder"]["macs"]) == total(decoder_layers(config))
    assert (nets["encoder"]["params"], nets["encoder"]["macs"]) == total(encoder_layers(config))
    assert (nets["discriminator"]["params"], nets["discriminator"]["macs"]) == total(
        discriminator_layers(config)
    )


def test_market_exact_values(market: dict[str, Any]) -> None:
    nets = market["networks"]
    assert nets["decoder"]["params"] == 71_197_123
    assert nets["encoder"]["params"] == 47_352_736
    assert nets["discriminator"]["params"] == 4_324_737
    assert market["totals"]["stage1_generator"]["params"] == 118_549_859
    # The input conv: 8192·9·370·128 = 3.49 GMAC, and the dominant 256→256 convs 4.83 GMAC (§9).
    assert conv(3, 370, 128, 128, 64)[1] == 3_491_758_080
    assert conv(3, 256, 256, 128, 64)[1] == 4_831_838_208


# --------------------------------------------------------------------------------------------------
# At the precision of the §9 table


def test_market_matches_spec_table(market: dict[str, Any]) -> None:
    nets, g = market["networks"], market["totals"]["stage1_generator"]
    assert market["preset"] == "market" and market["image"] == [128, 64]
    assert market["embedding_dim"] == 352
    assert params_m(g, 1) == 118.5
    assert params_m(nets["encoder"], 1) == 47.4
    assert params_m(nets["decoder"], 1) == 71.2
    assert params_m(nets["discriminator"], 2) == 4.32
    assert gmac(nets["decoder"], 1) == 40.7
    assert gmac(nets["encoder"], 1) == 27.4
    assert gmac(nets["discriminator"], 2) == 0.32
    assert gmac(g, 1) == 68.1
    assert round(2 * nets["decoder"]["macs"] / 1e9, 1) == 81.3  # FLOPs = 2·MACs
    assert round(2 * g["macs"] / 1e9) == 136


def test_market_small_networks_match_spec_table(market: dict[str, Any]) -> None:
    nets = market["networks"]
    assert params_m(nets["pose_encoder"], 2) == 2.15
    assert params_m(nets["pose_decoder"], 2) == 2.15
    assert params_m(nets["mapping_fg"], 2) == 2.33
    assert params_m(nets["mapping_bg"], 2) == 0.59
    assert params_m(nets["mapping_pose"], 2) == 2.13
    assert params_m(nets["critic_fg"], 2) == 0.90
    assert params_m(nets["critic_bg"], 2) == 0.85
    assert params_m(nets["critic_pose"], 2) == 0.81
    assert round(nets["pose_encoder"]["macs"] / 1e6, 1) == 2.1  # "~2.1 M each"
    assert round(nets["pose_decoder"]["macs"] / 1e6, 1) == 2.1
    for name in ("mapping_fg", "mapping_bg", "mapping_pose", "critic_fg", "critic_bg"):
        assert nets[name]["macs"] < 3e6  # "~0" next to the GMAC networks


def test_deepfashion_matches_spec_table(deepfashion: dict[str, Any]) -> None:
    nets, g = deepfashion["networks"], deepfashion["totals"]["stage1_generator"]
    assert deepfashion["embedding_dim"] == 224
    assert params_m(g, 1) == 140.2
    assert params_m(nets["encoder"], 1) == 58.1
    assert params_m(nets["decoder"], 1) == 82.1
    assert params_m(nets["discriminator"], 2) == 4.32
    assert round(g["macs"] / 1e9) == 365
    assert gmac(nets["decoder"], 1) == 315.7
    # §9 prints 49.6 G = 19.6 G (stem) + 7 × 4.29 G, a sum of rounded parts; the exact count is
    # 19.55 G + 30.00 G = 49.55 G (pinned exactly by the per-layer test above).
    assert abs(nets["encoder"]["macs"] / 1e9 - 49.6) < 0.06
    assert (
        round(conv(3, 3, 128, 256, 256)[1] / 1e9 + 2 * conv(3, 128, 128, 256, 256)[1] / 1e9, 1)
        == 19.6
    )
    assert gmac(nets["discriminator"], 2) == 2.60
    assert round(2 * g["macs"] / 1e9) == 730
    assert "mapping_bg" not in nets and "critic_bg" not in nets
    assert params_m(nets["mapping_fg"], 2) == 2.33 and params_m(nets["critic_pose"], 2) == 0.81


def test_totals_are_sums(market: dict[str, Any]) -> None:
    nets, totals = market["networks"], market["totals"]
    for key in ("params", "macs"):
        assert totals["stage1_generator"][key] == nets["encoder"][key] + nets["decoder"][key]
        assert totals["all"][key] == sum(n[key] for n in nets.values())
    assert set(nets) == {
        "encoder", "decoder", "discriminator", "pose_encoder", "pose_decoder",
        "mapping_fg", "critic_fg", "mapping_bg", "critic_bg", "mapping_pose", "critic_pose",
    }  # fmt: skip


def test_fast_input_conv_saves_most_of_the_input_conv(market: dict[str, Any]) -> None:
    dec = market["networks"]["decoder"]
    saved = dec["macs"] - dec["macs_fast_input_conv"]
    # The 352 constant channels of the 3.49 GMAC input conv are no longer convolved; what remains
    # is the conv of the 18 pose channels (8192·9·18·128 = 0.17 GMAC) and three einsums:
    # taps 9·352·128, per-column 128·3·3·64, per-row 128·3·128·64.
    plain_in = conv(3, 370, 128, 128, 64)[1]
    pose_in = conv(3, 18, 128, 128, 64)[1]
    einsums = 9 * 352 * 128 + 128 * 3 * 3 * 64 + 128 * 3 * 128 * 64
    assert saved == plain_in - pose_in - einsums == 3_318_263_808


def test_tiny_is_cheap_and_consistent() -> None:
    info = model_info(PRESETS["tiny"])
    nets = info["networks"]
    config = PRESETS["tiny"]
    assert (nets["decoder"]["params"], nets["decoder"]["macs"]) == total(decoder_layers(config))
    assert info["totals"]["all"]["params"] < 1e6
