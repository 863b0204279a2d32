"""`dpig model info`: the §9 numbers through the CLI, and its user errors (exit 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from cli.main import app
from dpig_core.config import PRESETS
from dpig_core.models import DPIG
from dpig_core.weights import INFERENCE_COMPONENTS, WeightsError, save_pretrained, verify

runner = CliRunner()


def test_market_json_gives_the_spec_numbers() -> None:
    result = runner.invoke(app, ["model", "info", "--preset", "market", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["preset"] == "market" and report["image"] == [128, 64]
    nets, g = report["networks"], report["totals"]["stage1_generator"]
    # The exact counts pinned in tests/dpig_core/test_model_info.py.
    assert (g["params"], g["macs"]) == (118_549_859, 68_079_464_448)
    assert nets["decoder"] == {
        "params": 71_197_123, "macs": 40_668_495_872, "macs_fast_input_conv": 37_350_232_064,
    }  # fmt: skip
    assert nets["encoder"] == {"params": 47_352_736, "macs": 27_410_968_576}
    assert nets["discriminator"] == {"params": 4_324_737, "macs": 324_419_584}
    assert round(g["params"] / 1e6, 1) == 118.5
    assert round(nets["encoder"]["params"] / 1e6, 1) == 47.4
    assert round(nets["decoder"]["params"] / 1e6, 1) == 71.2
    assert round(nets["discriminator"]["params"] / 1e6, 2) == 4.32
    assert round(nets["decoder"]["macs"] / 1e9, 1) == 40.7
    assert round(nets["encoder"]["macs"] / 1e9, 1) == 27.4
    assert round(nets["discriminator"]["macs"] / 1e9, 2) == 0.32


def test_table_output() -> None:
    result = runner.invoke(app, ["model", "info", "-p", "tiny"])
    assert result.exit_code == 0, result.output
    assert "tiny: 32×16" in result.output
    for name in ("encoder", "decoder", "discriminator", "critic_pose", "stage1_generator"):
        assert name in result.output


def test_weights_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = save_pretrained(DPIG(PRESETS["tiny"]), tmp_path / "w")
    result = runner.invoke(app, ["model", "info", "--weights", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["preset"] == "tiny"


def one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_preset_exits_2_with_one_line() -> None:
    result = runner.invoke(app, ["model", "info", "--preset", "nope", "--json"])
    one_line_error(result, "unknown preset 'nope'", "market, deepfashion, market-small, tiny")


def test_preset_or_weights_exactly_one(tmp_path: Path) -> None:
    one_line_error(runner.invoke(app, ["model", "info"]), "exactly one of")
    result = runner.invoke(app, ["model", "info", "-p", "tiny", "-w", str(tmp_path)])
    one_line_error(result, "exactly one of")


def test_weights_folder_without_config(tmp_path: Path) -> None:
    one_line_error(runner.invoke(app, ["model", "info", "-w", str(tmp_path)]), "config.json")


def test_weights_folder_with_bad_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_dict() | {"depth": 3}))
    one_line_error(runner.invoke(app, ["model", "info", "-w", str(tmp_path)]), "depth")
    (tmp_path / "config.json").write_text("{not json")
    assert runner.invoke(app, ["model", "info", "-w", str(tmp_path)]).exit_code == 2


def test_weights_folder_with_incomplete_config(tmp_path: Path) -> None:
    # A config.json without "height"/"width" is a user error too: it should be one line and exit 2,
    # not a TypeError traceback.
    (tmp_path / "config.json").write_text(json.dumps({"name": "x"}))
    one_line_error(runner.invoke(app, ["model", "info", "-w", str(tmp_path)]), "height")


def test_export_writes_an_inference_only_hashed_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = save_pretrained(DPIG(PRESETS["tiny"]), tmp_path / "src")
    card = tmp_path / "README.md"
    card.write_text("# card\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["model", "export", "--weights", str(src), "--out", str(out),
                                 "--name", "demo-model", "--version", "1.2.3",
                                 "--include", str(card)])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = verify(out)
    assert manifest["name"] == "demo-model" and manifest["version"] == "1.2.3"
    assert manifest["components"] == list(INFERENCE_COMPONENTS)
    assert "README.md" in manifest["files"]
    (out / "README.md").write_text("# edited\n")
    with pytest.raises(WeightsError, match="README.md"):
        verify(out)
    assert json.loads((out / "config.json").read_text())["name"] == "tiny"


def test_evaluate_reports_named_ssim_variants(tiny_market: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = save_pretrained(DPIG(PRESETS["tiny"]), tmp_path / "w")
    out = tmp_path / "metrics.json"
    args = ["model", "evaluate", "--weights", str(weights), "--data", str(tiny_market)]
    result = runner.invoke(app, [*args, "--fid-count", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["reconstruction"]
    assert report["images"] == 9  # 3 held-out identities × 4 images, one of each in query/
    assert set(report["ssim_variants"]) == {"ssim_dpig", "ssim_patn", "ssim_gfla"}
    assert 0 <= report["l1"] <= 1
    true_masks = json.loads(out.read_text())["true_masks"]
    assert true_masks["images"] == 9 and true_masks["swap_people"] == 3
    assert true_masks["perfect_render_ssim_dpig"] > true_masks["ssim_dpig"] + 0.2
    assert true_masks["perfect_render_person_l1"] < true_masks["person_l1"]
    assert 0 <= true_masks["ground_truth_leakage_ratio"] < true_masks["leakage_ratio"]
    too_many = runner.invoke(app, [*args, "--fid-count", "1000"])
    assert too_many.exit_code == 2 and "FID needs 2000 held-out images" in too_many.output


def test_curve_draws_the_heldout_points_of_a_run(tmp_path: Path) -> None:
    from PIL import Image

    figures = {"ssim_dpig": 0.2, "perfect_render_ssim_dpig": 0.92, "person_l1": 0.15,
               "perfect_render_person_l1": 0.01, "leakage_ratio": 0.5,
               "ground_truth_leakage_ratio": 0.05}  # fmt: skip
    lines = [
        {"stage": "stage1", "step": 250, "l1": 0.2},
        {"stage": "stage1_heldout", "step": 250, **figures},
        {"stage": "stage1_heldout", "step": 500, **figures, "ssim_dpig": 0.3},
        {"stage": "stage1_heldout", "step": 500, **figures, "ssim_dpig": 0.31},  # after a resume
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = runner.invoke(
        app, ["model", "curve", "--run", str(tmp_path), "--out", str(tmp_path / "c.png")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[0])["ssim_dpig"] == 0.31
    assert "(2 points)" in result.output
    assert Image.open(tmp_path / "c.png").size == (3 * 360, 220)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    empty = runner.invoke(
        app, ["model", "curve", "--run", str(tmp_path), "--out", str(tmp_path / "d.png")]
    )
    assert empty.exit_code == 2 and "stage1.eval_every" in empty.output
