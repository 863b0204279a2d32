from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from dpig_core.weights import from_pretrained, read_manifest

runner = CliRunner()


def test_train_all_writes_a_loadable_weights_folder(tiny_market: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "all", "--data", str(tiny_market), "--out", str(out), "--preset", "tiny",
        "--steps", "2", "--batch-size", "4", "--set", "stage1.sample_every=2", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    model = from_pretrained(out / "weights")
    assert model.config.name == "tiny" and not model.training
    assert read_manifest(out / "weights")["metadata"]["trained_stages"] == [
        "stage1", "pose-ae", "mappings",
    ]  # fmt: skip
    stages = [
        json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert stages == ["stage1", "pose_ae", "mappings"]
    assert (out / "samples" / "stage1_0000002.png").is_file()
    for name in ("stage1", "pose_ae", "mappings"):
        assert (out / "checkpoints" / f"{name}.pt").is_file()


def test_bad_set_and_missing_data_exit_2(tiny_market: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["train", "stage1", "--data", str(tmp_path / "nope"), "--out",
                                  str(tmp_path / "r")])  # fmt: skip
    assert missing.exit_code == 2 and "no such folder" in missing.output
    base = ["train", "stage1", "--data", str(tiny_market), "--out", str(tmp_path / "r")]
    bad = runner.invoke(app, [*base, "--preset", "tiny", "--set", "stage1.lrr=1"])
    assert bad.exit_code == 2 and "no field(s) lrr" in bad.output
    syntax = runner.invoke(app, ["train", "stage1", "--data", str(tiny_market), "--out",
                                 str(tmp_path / "r"), "--set", "lr=1"])  # fmt: skip
    assert syntax.exit_code == 2 and "STAGE.FIELD=VALUE" in syntax.output


def test_resume_without_checkpoint_is_a_clear_error(tiny_market: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "stage1", "--data", str(tiny_market), "--out",
                                 str(tmp_path / "r"), "--preset", "tiny", "--resume",
                                 "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "no checkpoint to resume from" in result.output
