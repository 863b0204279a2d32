"""The finaliser's manifest: the lines workers make beside the encoder are the bytes the
finaliser made from the shard's parquet before (and still makes for shards without them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.db import Chunk
from service.executor import PipelineCache
from service.finalize import ChunkOutput, write_outputs
from service.jobs import Context, job_prefix, open_context, submit, tenant_id
from service.runner import run_job
from service.settings import Settings
from service.specs import parse_spec
from tests.service.conftest import synthetic_people


@pytest.fixture(scope="module")
def pipes() -> Any:
    return PipelineCache(batch_size=4)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return synthetic_people(tmp_path_factory.mktemp("people"), identities=2, seed=3)


def _spec(kind: str, layout: str, people: tuple[Path, dict[str, Any]]) -> Any:
    folder, keypoints = people
    names = sorted(keypoints)
    refs = [{"uri": str(folder / n), "keypoints": keypoints[n]} for n in names]
    # a missing source whose URI holds what the finaliser's rewrite of `object` looks for
    evil = {"uri": str(folder / '"object": "shards' / "000000.tar#x.png"), "keypoints": None}
    common = {"chunk_size": 5, "seed": 4, "layout": layout}
    if kind == "sample":
        body: dict[str, Any] = {"kind": "sample", "identities": 3, "per_identity": 3}
    elif kind == "pose_grid":
        # drawn in a 96×48 frame: rescaled, the keypoints are not float32 numbers (10.67)
        poses = [{"id": f"p{j}", "keypoints": keypoints[n], "height": 96, "width": 48}
                 for j, n in enumerate(names[:3])]  # fmt: skip
        body = {"kind": "pose_grid", "images": str(folder), "poses": poses,
                "source_keypoints": keypoints,
                "source_custom_ids": {names[0]: "first"}}  # fmt: skip
    elif kind == "swap":
        items = [{"fg": refs[i % 4], "bg": refs[(i + 1) % 4], "pose": refs[(i + 2) % 4],
                  "custom_id": f"s{i}"} for i in range(6)]  # fmt: skip
        items[2]["fg"] = evil  # fails: its row has an error and no object
        body = {"kind": "swap", "items": items}
    else:
        body = {"kind": "interpolate", "pairs": [{"a": refs[0], "b": refs[1]}], "steps": 7}
    return parse_spec(common | body)


def _chunks(ctx: Context, job_id: str) -> list[ChunkOutput]:
    with ctx.session() as session:
        rows = session.execute(
            select(Chunk.id, Chunk.index, Chunk.state, Chunk.output_tag, Chunk.last_error)
            .where(Chunk.job_id == job_id)
            .order_by(Chunk.index)
        )
        return [ChunkOutput(*row) for row in rows]


@pytest.mark.parametrize("layout", ["webdataset", "files"])
@pytest.mark.parametrize("kind", ["sample", "pose_grid", "swap", "interpolate"])
def test_worker_made_manifest_lines_are_the_finalisers_own(
    kind: str, layout: str, people: tuple[Path, dict[str, Any]], pipes: Any, tmp_path: Path
) -> None:
    ctx = open_context(Settings.from_values(home=tmp_path / "home"), embedded=True)
    job = submit(ctx, tenant_id(ctx), _spec(kind, layout, people))
    assert run_job(ctx, job.id, pipes) == "completed"
    out = Path(ctx.storage.root_url.removeprefix("file://")) / job_prefix(job.id)
    made = {name: (out / name).read_bytes() for name in ("manifest.jsonl", "errors.jsonl")}
    rows = [json.loads(line) for line in made["manifest.jsonl"].splitlines()]
    assert [r["item"] for r in rows] == list(range(job.total_items))
    assert all(r["object"] is None or "-1.tar#" in r["object"] or layout == "files" for r in rows)
    if kind == "swap":
        assert rows[2]["status"] == "error" and b'"item": 2' in made["errors.jsonl"]
    else:
        assert made["errors.jsonl"] == b""

    # as a worker from before the lines left its shards: the finaliser reads the parquet rows
    line_files = sorted((out / "shards").glob("*.jsonl"))
    assert len(line_files) == len(_chunks(ctx, job.id)) >= 2
    for line_file in line_files:
        line_file.unlink()
        marker_path = line_file.with_suffix(".done.json")
        marker = json.loads(marker_path.read_text())
        del marker["jsonl_sha256"]
        marker_path.write_text(json.dumps(marker, sort_keys=True))
    written = write_outputs(ctx.storage, job_prefix(job.id), _chunks(ctx, job.id), cancelled=False)
    assert not written.corrupt and written.items == job.total_items
    assert written.done == sum(r["status"] == "ok" for r in rows)
    assert {name: (out / name).read_bytes() for name in made} == made


def test_a_shards_manifest_lines_are_checked_against_its_marker(
    people: tuple[Path, dict[str, Any]], pipes: Any, tmp_path: Path
) -> None:
    ctx = open_context(Settings.from_values(home=tmp_path / "home"), embedded=True)
    job = submit(ctx, tenant_id(ctx), _spec("sample", "webdataset", people))
    assert run_job(ctx, job.id, pipes) == "completed"
    out = Path(ctx.storage.root_url.removeprefix("file://")) / job_prefix(job.id)
    (lines,) = (out / "shards").glob("000001-*.jsonl")
    lines.write_bytes(lines.read_bytes().replace(b'"status": "ok"', b'"status": "ko"', 1))
    chunks = _chunks(ctx, job.id)
    written = write_outputs(ctx.storage, job_prefix(job.id), chunks, cancelled=False)
    why = f"{job_prefix(job.id)}shards/{lines.stem}.jsonl does not match its done marker's sha256"
    assert written.corrupt == {chunks[1].chunk_id: why}
