"""Per-item labels (service/labels.py) in the shard JSON and the manifest, with the bundled model
(64×32, the pose probe's frame) on SQLite + a local folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from service.executor import PipelineCache
from service.jobs import Context, open_context, submit, tenant_id
from service.runner import run_job
from service.settings import Settings
from service.specs import parse_spec
from tests.service.conftest import synthetic_people

L_WRIST = 7  # COCO-18


pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def pipes() -> PipelineCache:
    return PipelineCache(batch_size=16)


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return open_context(Settings.from_values(home=tmp_path / "home"), embedded=True)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return synthetic_people(tmp_path_factory.mktemp("people"), identities=2, seed=5)


def run(ctx: Context, pipes: PipelineCache, spec: dict[str, Any]) -> Path:
    job = submit(ctx, tenant_id(ctx), parse_spec(spec))
    assert run_job(ctx, job.id, pipes) == "completed"
    return Path(ctx.storage.root_url.removeprefix("file://")) / "jobs" / job.id


def shard_items(out: Path) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(image [3, H, W] in [−1, 1], its JSON) of every item, in item order."""
    found = []
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for name in sorted(n for n in files if n.endswith(".png")):
            pixels = np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB"), np.float32)
            image = torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)
            found.append((image, json.loads(files[name.removesuffix(".png") + ".json"])))
    return found


def test_sample_keypoints_are_where_the_pose_probe_finds_the_people(
    ctx: Context, pipes: PipelineCache
) -> None:
    from dpig_core.metrics.pose_probe import estimate, load_probe, pose_error

    out = run(ctx, pipes, {"kind": "sample", "count": 64, "seed": 0, "chunk_size": 32})
    items = shard_items(out)
    images = torch.stack([image for image, _ in items])
    labelled = np.asarray([meta["keypoints"] for _, meta in items])  # [64, 18, 3]
    found = estimate(load_probe(), images)
    score = pose_error(found, labelled, height=64)
    # measured: PCK@0.1 0.738, PCK@0.05 0.522 (docs/jobs.md, "Labels")
    assert score["pck_0.1"] >= 0.70 and score["pck_0.05"] >= 0.48, score
    # a label of another image scores far worse: the labels describe their own images
    other = pose_error(found, np.roll(labelled, 1, axis=0), height=64)
    assert score["pck_0.1"] - other["pck_0.1"] >= 0.15, (score, other)


def test_sample_z_seeds_reproduce_the_labelled_pose(ctx: Context, pipes: PipelineCache) -> None:
    from dpig_core.generate import Z_STD
    from dpig_core.models import factor_dims

    out = run(ctx, pipes, {"kind": "sample", "identities": 2, "per_identity": 3, "seed": 9})
    items = shard_items(out)
    pipe = next(iter(pipes._pipes.values()))
    dims = factor_dims(pipe.config)
    for _, meta in items:
        labels = meta["labels"]
        assert labels["fixed"] == {} and set(labels["z_seeds"]) == set(pipe.factors)
        z = torch.randn(dims["pose"][0], generator=torch.Generator().manual_seed(
            labels["z_seeds"]["pose"])) * Z_STD  # fmt: skip
        rcv = pipe.decode_poses(pipe.map_noise("pose", z[None]))[0]
        assert np.allclose(rcv.numpy(), meta["keypoints"], atol=0.01)
    # one foreground per identity: its z seed is shared, the pose's is not
    fg = [meta["labels"]["z_seeds"]["fg"] for _, meta in items]
    assert fg[0] == fg[1] == fg[2] != fg[3] == fg[4] == fg[5]
    assert len({meta["labels"]["z_seeds"]["pose"] for _, meta in items}) == 6


def test_pose_grid_swap_and_interpolate_labels(
    ctx: Context, pipes: PipelineCache, people: tuple[Path, dict[str, Any]]
) -> None:
    import duckdb

    folder, keypoints = people
    names = sorted(keypoints)
    target = keypoints[names[-1]]
    assert target[L_WRIST][2] > 0  # so the DuckDB query below has something to find
    out = run(ctx, pipes, {
        "kind": "pose_grid", "images": str(folder), "source_keypoints": keypoints,
        "poses": [{"id": "t0", "keypoints": target, "height": 128, "width": 64}],
    })  # fmt: skip
    items = shard_items(out)
    for name, (_, meta) in zip(names, items, strict=True):
        assert (meta["source"], meta["pose"]) == (name, "t0")
        assert meta["labels"] == {"source_keypoints": keypoints[name]}
        # the 128×64 target, in the 64×32 generated image's pixels
        half = [[r / 2, c / 2, float(v > 0)] if v > 0 else [0, 0, 0] for r, c, v in target]
        assert np.allclose(meta["keypoints"], half, atol=0.01)

    # the manifest carries the same labels, queryable with DuckDB (docs/jobs.md)
    manifest = str(out / "manifest.parquet")
    db = duckdb.connect()
    visible = db.execute(
        f"SELECT count(*) FROM '{manifest}' WHERE pose = 't0' AND keypoints[{L_WRIST + 1}][3] > 0"
    ).fetchall()
    assert visible == [(len(names),)]
    given = db.execute(
        f"SELECT source, labels->'$.source_keypoints' FROM '{manifest}' ORDER BY item"
    ).fetchall()
    assert [(s, json.loads(k)) for s, k in given] == [(n, keypoints[n]) for n in names]

    a, b, c = (str(folder / n) for n in names[:3])
    ref = {n: {"uri": str(folder / n), "keypoints": keypoints[n]} for n in names[:3]}
    out = run(ctx, pipes, {"kind": "swap", "items": [
        {"fg": ref[names[0]], "bg": ref[names[1]], "pose": ref[names[2]]},
        {"fg": ref[names[1]], "pose": ref[names[0]]},
    ]})  # fmt: skip
    (_, first), (_, second) = shard_items(out)
    assert first["labels"] == {"fg": a, "bg": b, "pose": c}
    assert second["labels"] == {"fg": b, "bg": None, "pose": a}
    pose_c = [[r, col, float(v > 0)] if v > 0 else [0, 0, 0] for r, col, v in keypoints[names[2]]]
    assert np.allclose(first["keypoints"], pose_c, atol=0.01)  # same 64×32 frame

    out = run(ctx, pipes, {"kind": "interpolate", "steps": 3, "method": "slerp",
                           "pairs": [{"a": ref[names[0]], "b": ref[names[1]]}]})  # fmt: skip
    steps = [meta["labels"] for _, meta in shard_items(out)]
    assert [(s["step"], s["t"], s["method"]) for s in steps] == [
        (0, 0.0, "slerp"),
        (1, 0.5, "slerp"),
        (2, 1.0, "slerp"),
    ]
    assert steps[0]["a"] == a and steps[0]["b"] == b
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [json.loads(r["labels"])["step"] for r in rows] == [0, 1, 2]
    assert all(r["keypoints"] is None for r in rows)
