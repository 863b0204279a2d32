"""dpig_core.config: presets, derived sizes, JSON round trip and validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dpig_core.config import PRESETS, DPIGConfig, get_preset
from dpig_core.pose import RoiPadding


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name: str, tmp_path: Path) -> None:
    config = PRESETS[name]
    assert config.name == name
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    assert DPIGConfig.from_json(text) == config
    assert DPIGConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    path.write_text(text)
    assert DPIGConfig.load(path) == config


def test_json_is_stable_and_sorted() -> None:
    text = PRESETS["market"].to_json()
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    assert json.loads(text)["disc_logit_width"] == 16384
    assert json.loads(PRESETS["tiny"].to_json())["disc_logit_width"] is None


def test_market_preset_sizes() -> None:
    c = PRESETS["market"]
    assert (c.height, c.width, c.hidden, c.encoder) == (128, 64, 128, "fgbg")
    assert (c.roi_size, c.roi_depth, c.roi_dim, c.bg_dim, c.bottleneck_dim) == (48, 5, 32, 128, 64)
    assert c.fg_dim == 224 and c.has_bg and c.embedding_dim == 352
    assert c.repeat == 5
    assert c.disc_features == 8 * 4 * 512 == 16384
    assert c.mask_radius == 7 and c.pose_radius == 4
    assert c.roi_padding == RoiPadding.market()


def test_deepfashion_preset_sizes() -> None:
    c = PRESETS["deepfashion"]
    assert (c.height, c.width, c.encoder, c.roi_size, c.roi_depth) == (256, 256, "app", 64, 7)
    assert not c.has_bg and c.embedding_dim == 224
    assert c.repeat == 6 and c.decoder_depth == 5
    assert c.disc_features == 16 * 16 * 512 == 131072
    assert c.disc_features // c.disc_logit_width == 8
    assert c.roi_padding == RoiPadding.deepfashion()
    assert c.pose_radius == 4  # not rescaled for 256² (§11.17)


def test_small_presets_scale_roi_padding() -> None:
    small = PRESETS["market-small"]
    assert (small.roi_padding.pad, small.roi_padding.pad_single) == (3, 5)
    assert PRESETS["tiny"].embedding_dim == 7 * 4 + 8


def test_unknown_field_raises_value_error_naming_it() -> None:
    data = PRESETS["tiny"].to_dict() | {"hiden": 3, "zeta": 1}
    with pytest.raises(ValueError, match="unknown config field.*hiden, zeta"):
        DPIGConfig.from_dict(data)
    with pytest.raises(ValueError, match="hiden"):
        DPIGConfig.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": -16}, "width must be positive, got -16"),
        ({"hidden": 0}, "hidden must be positive, got 0"),
        ({"height": 24}, "multiples of 16"),
        ({"width": 48, "decoder_depth": 6}, r"divisible by 2\^\(decoder_depth-1\) = 32"),
        ({"roi_size": 10}, "roi_size 10 must be divisible by 2\\^\\(roi_depth-1\\)"),
        ({"disc_logit_width": 100}, "disc_logit_width 100 must be a positive divisor of the 128"),
        ({"height": 48, "bg_depth": 6}, r"48x16 must be divisible by 2\^\(bg_depth-1\)"),
    ],
)
def test_invalid_sizes_raise_value_error(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        PRESETS["tiny"].with_changes(**changes)
    assert str(info.value).startswith("invalid config 'tiny': ")


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(ValueError, match="height must be positive.*roi_size 10"):
        PRESETS["tiny"].with_changes(height=0, roi_size=10)


def test_invalid_sizes_from_json_raise_value_error() -> None:
    data = PRESETS["market"].to_dict() | {"height": 100}
    with pytest.raises(ValueError, match="invalid config 'market'"):
        DPIGConfig.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "changes",
    [
        # The background tower halves the width too: 16 / 2^5 is not an integer, the bg FC would be
        # built for 0 columns and the encoder fails at its first forward (RuntimeError).
        {"bg_depth": 6},
        # 0 would mean "0-wide logit rows"; `x % 0` raises ZeroDivisionError instead.
        {"disc_logit_width": 0},
        # A tower needs at least one block: depth 0 gives 2^-1 = 0.5, which divides everything.
        {"decoder_depth": 0},
        {"roi_depth": 0},
    ],
    ids=["bg_depth_vs_width", "disc_logit_width_0", "decoder_depth_0", "roi_depth_0"],
)
def test_impossible_depths_and_widths_raise_value_error(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="invalid config"):
        PRESETS["tiny"].with_changes(**changes)


def test_configs_are_frozen_and_with_changes_copies() -> None:
    tiny = PRESETS["tiny"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.hidden = 3  # type: ignore[misc]
    wider = tiny.with_changes(hidden=16)
    assert wider.hidden == 16 and tiny.hidden == 8 and wider.name == "tiny"


def test_get_preset() -> None:
    assert get_preset("market") is PRESETS["market"]
    with pytest.raises(
        ValueError, match="unknown preset 'nope'; choose one of market, deepfashion"
    ):
        get_preset("nope")
