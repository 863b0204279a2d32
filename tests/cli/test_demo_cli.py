from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from dpig_core.config import PRESETS
from dpig_core.models import DPIG
from dpig_core.weights import INFERENCE_COMPONENTS, save_pretrained

runner = CliRunner()


def test_demo_writes_pose_grid_and_samples(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = save_pretrained(
        DPIG(PRESETS["tiny"]), tmp_path / "w", components=INFERENCE_COMPONENTS
    )
    out = tmp_path / "demo"
    args = ["--sources", "2", "--poses", "3", "--identities", "2", "--per-identity", "2"]
    result = runner.invoke(app, ["demo", "--model", str(weights), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert len(list((out / "pose_grid").glob("*.png"))) == 6
    assert sorted(p.name for p in (out / "samples").glob("*.png"))[0] == "0001_c1s1_000000_00.png"
    sheet = np.asarray(Image.open(out / "pose_grid.png"))
    # 3 rows (pose header + 2 sources) × 4 columns (source + 3 poses) of 32×16 tiles, gap 2, ×3
    assert sheet.shape == ((3 * 34 + 2) * 3, (4 * 18 + 2) * 3, 3)
    assert "pose grid: 6 images" in result.output


def test_demo_with_a_missing_model_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--model", str(tmp_path / "none")])
    assert result.exit_code == 2 and "local folder only" in result.output
