"""`dpig export JOB --format coco|market|files` on the embedded default with the bundled model:
COCO loads in pycocotools and evaluates to AP 1.0 against itself; Market is read back by dpig's
own reader; files keeps every label."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from service.settings import get_settings

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in ("DPIG_API_URL", "DPIG_DATABASE_URL", "DPIG_STORAGE_URL", "DPIG_BROKER_URL",
                 "DPIG_MODEL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPIG_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def ok(*args: Any) -> Any:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def manifest(home: Path, job: dict[str, Any]) -> list[dict[str, Any]]:
    return pq.read_table(home / "outputs" / "jobs" / job["id"] / "manifest.parquet").to_pylist()


def test_coco_export_loads_in_pycocotools_and_self_evaluates_to_ap_1(
    home: Path, tmp_path: Path
) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    job = ok("submit", "sample", "--identities", 4, "--per-identity", 3, "--chunk-size", 5)
    summary = ok("export", job["id"], "--format", "coco", "--out", tmp_path / "coco")
    assert (summary["images"], summary["annotations"]) == (12, 12)
    coco = COCO(str(tmp_path / "coco" / "annotations" / "person_keypoints.json"))
    assert len(coco.getImgIds()) == 12 and coco.loadCats(1)[0]["keypoints"][9] == "left_wrist"
    rows = {r["item"]: r for r in manifest(home, job)}
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        assert (tmp_path / "coco" / image["file_name"]).is_file()
        assert (image["width"], image["height"]) == (32, 64)
        kp18 = rows[ann["image_id"] - 1]["keypoints"]
        r, c, v = kp18[7]  # COCO-18 l_wrist → COCO-17 index 9, (x, y) = (col, row)
        assert ann["keypoints"][27:30] == ([c, r, 2] if v else [0, 0, 0])
        x, y, w, h = ann["bbox"]
        xs, ys = ann["keypoints"][0::3], ann["keypoints"][1::3]
        seen = [i for i, v in enumerate(ann["keypoints"][2::3]) if v]
        assert all(x <= xs[i] <= x + w and y <= ys[i] <= y + h for i in seen)
    detections = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in coco.loadAnns(coco.getAnnIds())
    ]
    evaluation = COCOeval(coco, coco.loadRes(detections), "keypoints")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # AP at OKS 0.50:0.95
    assert evaluation.stats[5] == pytest.approx(1.0)  # AR


def test_market_export_is_read_back_by_dpigs_reader(home: Path, tmp_path: Path) -> None:
    from dpig_core.data.readers import read_market

    job = ok("submit", "sample", "--identities", 3, "--per-identity", 2, "--layout", "files")
    ok("export", job["id"], "--format", "market", "--out", tmp_path / "market")
    index = read_market(tmp_path / "market", splits=("train",))
    assert not [p for p in index.problems if p.kind != "missing_folder"], index.problems
    assert len(index.records) == 6
    assert [r.identity for r in index.records] == ["0001", "0001", "0002", "0002", "0003", "0003"]
    rows = manifest(home, job)
    for record, row in zip(index.records, rows, strict=True):
        assert record.rcv is not None
        expected = np.asarray(row["keypoints"])
        visible = expected[:, 2] > 0
        assert np.array_equal(record.rcv[:, 2] > 0, visible)
        assert np.array_equal(record.rcv[visible, :2], np.floor(expected[visible, :2]))


def test_files_export_keeps_every_label(home: Path, tmp_path: Path) -> None:
    job = ok("submit", "sample", "--identities", 2, "--per-identity", 2)
    summary = ok("export", job["id"], "--format", "files", "--out", tmp_path / "files")
    assert summary["images"] == 4
    labels = [json.loads(line) for line in (tmp_path / "files" / "labels.jsonl").open()]
    assert [entry["path"] for entry in labels] == [
        "0000/0000000000.png",
        "0000/0000000001.png",
        "0001/0000000002.png",
        "0001/0000000003.png",
    ]
    rows = manifest(home, job)
    assert [entry["keypoints"] for entry in labels] == [r["keypoints"] for r in rows]
    assert [entry["labels"] for entry in labels] == [json.loads(r["labels"]) for r in rows]
    assert all((tmp_path / "files" / entry["path"]).is_file() for entry in labels)

    again = runner.invoke(app, ["export", job["id"], "--format", "files", "--out",
                                str(tmp_path / "files")])  # fmt: skip
    assert again.exit_code == 2 and "is not empty" in again.stderr
    bad = runner.invoke(app, ["export", job["id"], "--format", "yolo", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "format: expected one of coco, market, files" in bad.stderr
    queued = ok("submit", "sample", "--count", 2, "--detach")
    early = runner.invoke(app, ["export", queued["id"], "--format", "coco", "--out",
                                str(tmp_path / "early")])  # fmt: skip
    assert early.exit_code == 2 and "is queued; export a job once it has settled" in early.stderr


def test_a_stale_upload_after_finalisation_is_not_exported(home: Path, tmp_path: Path) -> None:
    import shutil

    job = ok("submit", "sample", "--count", 6, "--chunk-size", 3)
    shards = home / "outputs" / "jobs" / job["id"] / "shards"
    # a worker that lost chunk 0's lease uploads its attempt late, beside the committed one
    for committed in sorted(shards.glob("000000-1.*")):
        shutil.copyfile(committed, shards / committed.name.replace("000000-1", "000000-7"))
    summary = ok("export", job["id"], "--format", "files", "--out", tmp_path / "files")
    assert summary["images"] == 6
    labels = [json.loads(line) for line in (tmp_path / "files" / "labels.jsonl").open()]
    assert [entry["item"] for entry in labels] == list(range(6))
