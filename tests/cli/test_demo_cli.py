"""`dpig demo`: a sample job and a pose-grid job through the embedded job service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from dpig_core.config import PRESETS
from dpig_core.models import DPIG
from dpig_core.weights import INFERENCE_COMPONENTS, save_pretrained
from service.settings import get_settings

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    torch.manual_seed(0)
    weights = save_pretrained(
        DPIG(PRESETS["tiny"]), tmp_path / "w", components=INFERENCE_COMPONENTS
    )
    for name in ("DPIG_API_URL", "DPIG_DATABASE_URL", "DPIG_STORAGE_URL", "DPIG_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPIG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DPIG_MODEL", str(weights))
    get_settings.cache_clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "home"
    torch.set_num_threads(threads)
    get_settings.cache_clear()


SMALL = ["--sources", "2", "--poses", "3", "--identities", "2", "--per-identity", "2"]


def test_demo_runs_two_jobs_and_writes_contact_sheets(home: Path) -> None:
    result = runner.invoke(app, ["demo", *SMALL])
    assert result.exit_code == 0, result.output
    jobs = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    assert sorted(j["kind"] for j in jobs) == ["pose_grid", "sample"]
    for job in jobs:
        assert (job["state"], job["failed_items"]) == ("completed", 0)
        assert job["spec"] is None  # views leave the spec out; status --full has it
        full = json.loads(runner.invoke(app, ["status", job["id"], "--json", "--full"]).stdout)
        assert full["spec"]["layout"] == "webdataset"
        folder = home / "outputs" / "jobs" / job["id"]
        assert list((folder / "shards").glob("*.tar"))
        assert pq.read_table(folder / "manifest.parquet").num_rows == job["total_items"]
        assert str(folder) in result.stdout
    by_kind = {j["kind"]: j for j in jobs}
    assert by_kind["sample"]["total_items"] == 4 and by_kind["pose_grid"]["total_items"] == 6
    # every source of the pose grid came with its keypoints (no estimation needed)
    grid_id = by_kind["pose_grid"]["id"]
    grid = json.loads(runner.invoke(app, ["status", grid_id, "--json", "--full"]).stdout)
    assert len(grid["spec"]["source_keypoints"]) == 2

    # pose grid: a header row of skeletons + 2 sources; a source column + 3 poses; 32×16 tiles,
    # gap 2, ×3
    grid = np.asarray(Image.open(home / "demo" / "pose_grid.png"))
    assert grid.shape == ((3 * 34 + 2) * 3, (4 * 18 + 2) * 3, 3)
    samples = np.asarray(Image.open(home / "demo" / "samples.png"))
    assert samples.shape == ((2 * 34 + 2) * 3, (2 * 18 + 2) * 3, 3)
    assert "pose_grid job" in result.stdout and "2 sources × 3 poses" in result.stdout
    assert f"contact sheet: {home / 'demo' / 'pose_grid.png'}" in result.stdout

    # a second run reuses the synthetic people and gives the same pixels
    again = runner.invoke(app, ["demo", *SMALL, "--json"])
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["pose_grid"]["contact_sheet"] == str(home / "demo" / "pose_grid.png")
    assert np.array_equal(np.asarray(Image.open(home / "demo" / "pose_grid.png")), grid)
    first, second = by_kind["sample"], report["sample"]["job"]
    for ext in ("tar", "parquet"):  # the same bytes under each attempt's own key
        (a,) = (home / "outputs" / "jobs" / first["id"] / "shards").glob(f"000000-*.{ext}")
        (b,) = (Path(report["sample"]["images"]) / "shards").glob(f"000000-*.{ext}")
        assert a.read_bytes() == b.read_bytes()
    assert second["id"] != first["id"]


def test_demo_with_a_missing_model_exits_2(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPIG_MODEL", str(home / "none"))
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 2 and "is not a weights folder" in result.output
    result = runner.invoke(app, ["demo", "--model", "nope"])
    assert result.exit_code == 2 and "unknown model 'nope'" in result.output
