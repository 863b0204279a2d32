from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from dpig_core.config import PRESETS
from dpig_core.models import DPIG
from dpig_core.weights import save_pretrained

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_pretrained(DPIG(PRESETS["tiny"]), tmp_path_factory.mktemp("w"), name="tiny-test")


def test_swap_writes_a_report_and_a_contact_sheet(
    tiny_weights: Path, tiny_market: Path, tmp_path: Path
) -> None:
    out = tmp_path / "swap"
    result = runner.invoke(app, ["eval", "swap", "--model", str(tiny_weights), "--data",
                                 str(tiny_market), "--people", "3", "--out", str(out), "--json",
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "swap" and report["model"]["name"] == "tiny-test"
    assert json.loads((out / "report.json").read_text())["leakage"] == report["leakage"]
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert report["files"]["contact_sheet"] == str(out / "contact_sheet.png")


def test_transfer_names_what_it_could_not_measure(
    tiny_weights: Path, tiny_market: Path, tmp_path: Path
) -> None:
    args = ["eval", "transfer", "--model", str(tiny_weights), "--data", str(tiny_market),
            "--pairs", "4", "--no-fid", "--out", str(tmp_path / "t")]  # fmt: skip
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    unavailable = json.loads(result.output)["unavailable"]
    assert unavailable["fid"] == "--no-fid"
    assert "--is-weights" in unavailable["inception_score"]
    assert "lpips" in unavailable
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "vs_true_rendering" in table.output


def test_bad_arguments_exit_2_with_one_line(
    tiny_weights: Path, tiny_market: Path, tmp_path: Path
) -> None:
    base = ["eval", "transfer", "--model", str(tiny_weights), "--no-fid"]
    cases = {
        "--mask must be target or source": [*base, "--data", str(tiny_market), "--mask", "x"],
        "not found": [*base, "--data", str(tiny_market), "--is-weights", str(tmp_path / "no.pth")],
        "no such": [*base, "--data", str(tmp_path / "missing")],
    }
    for message, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.output.lower(), result.output
