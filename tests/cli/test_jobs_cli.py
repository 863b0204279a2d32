"""The job commands (`dpig submit | status | watch | list | cancel | pause | resume | retry |
download | models`) on the embedded default: SQLite + a local folder under DPIG_HOME, jobs run
in-process, with a tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import exit_codes
from cli.main import app
from dpig_core.config import PRESETS
from dpig_core.data.pose_files import write_pose_file
from dpig_core.data.readers import read_dataset
from dpig_core.models import DPIG
from dpig_core.weights import INFERENCE_COMPONENTS, save_pretrained
from service.jobs import JobView
from service.settings import get_settings

runner = CliRunner()
H, W = 32, 16  # the tiny preset's frame
JOB_FIELDS = set(JobView.model_fields)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights") / "tiny"
    return save_pretrained(DPIG(PRESETS["tiny"]), folder, components=INFERENCE_COMPONENTS)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32×16 Market-1501 dataset: 4 identities × 2 images in bounding_box_train/, annotated."""
    from dpig_core.data.synth import write_market_dataset

    root = tmp_path_factory.mktemp("people")
    write_market_dataset(root, identities=4, per_identity=2, height=H, width=W, seed=1,
                         test_fraction=0.0, query_per_identity=0, progress=False)  # fmt: skip
    return root


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_weights: Path) -> Iterator[Path]:
    for name in ("DPIG_API_URL", "DPIG_DATABASE_URL", "DPIG_STORAGE_URL", "DPIG_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPIG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DPIG_MODEL", str(tiny_weights))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def dpig(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: Any) -> Any:
    """Run a command with --json; it must succeed; returns the parsed output."""
    result = dpig(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ended(code: int, *args: Any) -> Any:
    """Run a command with --json that follows a job; it must exit with `code`."""
    result = dpig(*args, "--json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def spec_of(job: dict[str, Any]) -> Any:
    """A job's spec: `--json` views leave it out, `dpig status --full` adds it."""
    return ok("status", job["id"], "--full")["spec"]


def test_submit_json_leaves_the_spec_out(home: Path) -> None:
    job = ok("submit", "sample", "--count", 2, "--detach")
    assert job["spec"] is None
    assert spec_of(job)["count"] == 2


def records(people: Path) -> list[Any]:
    return sorted(
        (r for r in read_dataset(people).records if r.rcv is not None), key=lambda r: r.path
    )


def pose_file(people: Path, path: Path, count: int) -> Path:
    """`count` target poses: those of the last annotated images (32×16 frame)."""
    chosen = records(people)[-count:]
    write_pose_file(path, [(r.path.name, r.rcv) for r in chosen], H, W)
    return path


def job_dir(home: Path, job: dict[str, Any]) -> Path:
    return home / "outputs" / "jobs" / job["id"]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").iterdir())}


def grid(people: Path, tmp_path: Path, *extra: Any) -> dict[str, Any]:
    poses = pose_file(people, tmp_path / "poses.json", 2)
    return ok(
        "submit", "--pose-grid", poses, "--images", people / "bounding_box_train",
        "--max-sources", 3, "--chunk-size", 4, *extra,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# pose grid


def test_pose_grid_makes_every_source_in_every_pose(
    home: Path, people: Path, tmp_path: Path
) -> None:
    import webdataset as wds

    job = grid(people, tmp_path)
    assert set(job) == JOB_FIELDS
    assert (job["kind"], job["state"], job["total_items"]) == ("pose_grid", "completed", 6)
    assert (job["done_items"], job["failed_items"]) == (6, 0)
    # the split folder's keypoints came from the dataset's annotation CSV
    assert len(spec_of(job)["source_keypoints"]) == 3
    folder = job_dir(home, job)
    assert (folder / "_SUCCESS").is_file()
    manifest = pq.read_table(folder / "manifest.parquet").to_pylist()
    assert [r["item"] for r in manifest] == list(range(6))
    assert {r["status"] for r in manifest} == {"ok"}
    assert [(r["source"], r["pose"]) for r in manifest[:2]] == [
        (manifest[0]["source"], p["id"]) for p in spec_of(job)["poses"]
    ]
    tars = sorted(str(p) for p in (folder / "shards").glob("*.tar"))
    assert len(tars) == 2  # 6 items in chunks of 4
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == 6
    assert [s["__key__"] for s in samples] == [r["key"] for r in manifest]
    for sample, row in zip(samples, manifest, strict=True):
        assert Image.open(io.BytesIO(sample["png"])).size == (W, H)
        assert hashlib.sha256(sample["png"]).hexdigest() == row["sha256"]
        meta = json.loads(sample["json"])
        assert (meta["source"], meta["pose"], meta["item"]) == (
            row["source"],
            row["pose"],
            row["item"],
        )


def test_same_spec_and_seed_give_byte_identical_shards(
    home: Path, people: Path, tmp_path: Path
) -> None:
    first = grid(people, tmp_path, "--seed", 7)
    second = grid(people, tmp_path, "--seed", 7)
    assert first["id"] != second["id"]
    a, b = shard_bytes(job_dir(home, first)), shard_bytes(job_dir(home, second))
    assert sorted(a) == [
        f"00000{i}-1.{ext}" for i in (0, 1) for ext in ("done.json", "jsonl", "parquet", "tar")
    ]
    assert a == b
    assert (job_dir(home, first) / "manifest.parquet").read_bytes() == (
        job_dir(home, second) / "manifest.parquet"
    ).read_bytes()


def test_keypoints_file_gives_a_plain_folder_its_keypoints(
    home: Path, people: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for record in records(people)[:2]:
        shutil.copyfile(record.path, folder / record.path.name)
    poses = pose_file(people, tmp_path / "poses.json", 1)
    csv = people / "market-annotation-train.csv"
    job = ok("submit", "--pose-grid", poses, "--images", folder, "--keypoints", csv)
    assert sorted(spec_of(job)["source_keypoints"]) == sorted(p.name for p in folder.iterdir())
    assert (job["state"], job["done_items"], job["failed_items"]) == ("completed", 2, 0)


def test_pose_file_without_a_frame_takes_the_models(
    home: Path, people: Path, tmp_path: Path
) -> None:
    # a Market CSV says nothing of its frame: the model's (32×16) is assumed and checked
    csv = people / "market-annotation-train.csv"
    job = ok(
        "submit", "--pose-grid", csv, "--images", people / "bounding_box_train",
        "--max-sources", 1, "--detach",
    )  # fmt: skip
    assert job["state"] == "queued" and job["total_items"] == len(records(people))
    assert {(p["height"], p["width"]) for p in spec_of(job)["poses"]} == {(H, W)}
    # --pose-size rescales a file's own frame
    poses = pose_file(people, tmp_path / "poses.json", 1)
    job = ok(
        "submit", "--pose-grid", poses, "--pose-size", "64x32", "--images",
        people / "bounding_box_train", "--max-sources", 1, "--detach",
    )  # fmt: skip
    assert (spec_of(job)["poses"][0]["height"], spec_of(job)["poses"][0]["width"]) == (64, 32)


# ------------------------------------------------------------------------------------------------
# the other kinds


def test_sample_swap_and_interpolate(home: Path, people: Path) -> None:
    a, b, c = (r.path for r in records(people)[:3])
    job = ok("submit", "sample", "--identities", 2, "--per-identity", 2, "--layout", "files")
    assert (job["kind"], job["state"], job["done_items"]) == ("sample", "completed", 4)
    names = sorted(p.name for p in (job_dir(home, job) / "images").iterdir())
    assert names[0] == "0000_c1s1_000000_00.png" and names[-1] == "0001_c1s1_000003_00.png"

    job = ok("submit", "sample", "--count", 2, "--pose", c)
    assert spec_of(job)["pose"]["keypoints"] is not None  # read from the dataset's annotations
    assert (job["state"], job["done_items"]) == ("completed", 2)

    job = ok("submit", "swap", "--fg", a, "--bg", b, "--pose", c)
    assert [spec_of(job)["items"][0][f]["uri"] for f in ("fg", "bg", "pose")] == [
        str(a),
        str(b),
        str(c),
    ]
    assert (job["kind"], job["state"], job["done_items"]) == ("swap", "completed", 1)

    job = ok("submit", "interpolate", "--a", a, "--b", b, "--steps", 3, "--method", "slerp")
    assert (job["kind"], job["state"], job["done_items"]) == ("interpolate", "completed", 3)


def test_swap_from_file(home: Path, people: Path, tmp_path: Path) -> None:
    a, b, c = (str(r.path) for r in records(people)[:3])
    rows = tmp_path / "items.json"
    rows.write_text(json.dumps([{"fg": a, "bg": b, "pose": c}, {"fg": c, "pose": a}]))
    job = ok("submit", "swap", "--from-file", rows)
    assert (job["total_items"], job["done_items"]) == (2, 2)
    assert "bg" not in spec_of(job)["items"][1] or spec_of(job)["items"][1]["bg"] is None


def test_submit_prints_progress_and_where_the_outputs_are(home: Path) -> None:
    result = dpig("submit", "sample", "--count", 3)
    assert result.exit_code == 0, result.output
    job = ok("list")[0]
    assert f"job {job['id']} (sample, 3 items) completed: 3 done, 0 failed" in result.stdout
    assert f"outputs: {job_dir(home, job)}/" in result.stdout
    assert "3/3" in result.stderr  # the progress bar


# ------------------------------------------------------------------------------------------------
# status, list, control


def test_status_and_list(home: Path) -> None:
    first = ok("submit", "sample", "--count", 2)
    second = ok("submit", "sample", "--count", 4, "--detach")
    assert second["state"] == "queued" and second["started_at"] is None

    status = ok("status", first["id"])
    assert set(status) == JOB_FIELDS and status["state"] == "completed"
    assert status["output_uri"] == job_dir(home, first).as_uri() + "/"

    jobs = ok("list")
    assert [j["id"] for j in jobs] == [second["id"], first["id"]]  # newest first
    assert all(set(j) == JOB_FIELDS for j in jobs)
    assert [j["id"] for j in ok("list", "--state", "queued")] == [second["id"]]
    assert len(ok("list", "--limit", 1)) == 1

    table = dpig("list")
    assert table.exit_code == 0 and first["id"] in table.stdout and "queued" in table.stdout
    text = dpig("status", first["id"])
    assert text.exit_code == 0 and "completed" in text.stdout and "2/2" in text.stdout


def test_pause_resume_cancel_and_watch(home: Path) -> None:
    job = ok("submit", "sample", "--count", 6, "--chunk-size", 2, "--detach")
    assert job["state"] == "queued"
    assert ok("pause", job["id"])["state"] == "paused"
    # watch returns at once on a paused job; nothing runs
    assert ended(exit_codes.PAUSED, "watch", job["id"])["state"] == "paused"
    assert ok("resume", job["id"], "--detach")["state"] == "queued"
    assert ok("pause", job["id"])["state"] == "paused"
    resumed = ok("resume", job["id"])  # embedded: runs it here
    assert (resumed["state"], resumed["done_items"]) == ("completed", 6)
    assert len(list((job_dir(home, job) / "shards").glob("*.tar"))) == 3

    again = dpig("resume", job["id"])
    assert again.exit_code == 2
    assert again.stderr.strip() == "error: cannot resume a job that is completed"

    doomed = ok("submit", "sample", "--count", 4, "--chunk-size", 2, "--detach")
    cancelled = ok("cancel", doomed["id"])
    assert (cancelled["state"], cancelled["done_items"]) == ("cancelled", 0)
    assert (job_dir(home, doomed) / "_CANCELLED").is_file()
    assert pq.read_table(job_dir(home, doomed) / "manifest.parquet").num_rows == 0

    queued = ok("submit", "sample", "--count", 4, "--chunk-size", 2, "--detach")
    watched = ok("watch", queued["id"])  # queued and nobody runs it: watch runs it
    assert (watched["state"], watched["done_items"]) == ("completed", 4)


def test_retry_reruns_failed_chunks_only(home: Path, people: Path, tmp_path: Path) -> None:
    good = records(people)[:3]
    folder = tmp_path / "sources"
    folder.mkdir()
    for record in good[:2]:
        shutil.copyfile(record.path, folder / record.path.name)
    (folder / "zz_broken.jpg").write_bytes(b"not an image")
    keypoints = tmp_path / "keypoints.json"
    write_pose_file(
        keypoints,
        [(r.path.name, r.rcv) for r in good[:2]] + [("zz_broken.jpg", good[2].rcv)],
        H,
        W,
    )
    poses = pose_file(people, tmp_path / "poses.json", 2)
    job = ended(
        exit_codes.COMPLETED_WITH_FAILURES,
        "submit", "--pose-grid", poses, "--images", folder, "--keypoints", keypoints,
        "--chunk-size", 2,
    )  # fmt: skip
    assert (job["state"], job["done_items"], job["failed_items"]) == ("completed", 4, 2)
    folder_out = job_dir(home, job)
    errors = [json.loads(line) for line in (folder_out / "errors.jsonl").read_text().splitlines()]
    assert [e["item"] for e in errors] == [4, 5] and "unreadable image" in errors[0]["error"]
    before = shard_bytes(folder_out)

    shutil.copyfile(good[2].path, folder / "zz_broken.jpg")  # repair the source
    queued = ok("retry", job["id"], "--detach")
    assert queued["state"] == "queued"
    retried = ok("watch", job["id"])
    assert (retried["state"], retried["done_items"], retried["failed_items"]) == ("completed", 6, 0)
    after = shard_bytes(folder_out)
    for name in before:  # the chunks without failures were not re-run
        if not name.startswith("000002"):
            assert after[name] == before[name], name
    assert after["000002-2.tar"] != before["000002-1.tar"]  # the rerun's own keys
    assert "000002-1.tar" not in after  # the replaced attempt was swept
    assert (folder_out / "errors.jsonl").read_text() == ""

    again = dpig("retry", job["id"])
    assert again.exit_code == 2 and "no failed items" in again.stderr


def test_download_copies_every_object(home: Path, tmp_path: Path) -> None:
    job = ok("submit", "sample", "--count", 5, "--chunk-size", 2)
    out = tmp_path / "copy"
    result = ok("download", job["id"], out)
    source = job_dir(home, job)
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == files
    # 3 shards of 4 objects, then job.json, the manifests and the marker
    assert result["files"] == len(files) == 3 * 4 + 5
    for rel in files:
        assert (out / rel).read_bytes() == (source / rel).read_bytes()
    assert result["bytes"] == sum((source / rel).stat().st_size for rel in files)


# ------------------------------------------------------------------------------------------------
# models


def test_models_list_register_info(home: Path, tiny_weights: Path) -> None:
    models = ok("models", "list")
    assert [m["name"] for m in models] == ["default"]
    assert models[0]["resolution"] == f"{H}x{W}" and models[0]["path"] == str(tiny_weights)

    info = ok("models", "register", "tiny", tiny_weights)
    assert (info["name"], info["resolution"]) == ("tiny", f"{H}x{W}")
    assert [m["name"] for m in ok("models", "list")] == ["default", "tiny"]
    info = ok("models", "info", "tiny")
    assert info["config"]["height"] == H and info["weights_sha256"] == models[0]["weights_sha256"]
    job = ok("submit", "sample", "--count", 1, "--model", "tiny")
    assert (job["model"], job["state"]) == ("tiny", "completed")

    text = dpig("models", "list")
    assert text.exit_code == 0 and "tiny" in text.stdout
    for args, message in (
        (("register", "default", tiny_weights), "'default' is reserved"),
        (("register", "x", home / "none"), "path:"),
        (("info", "nope"), "model: unknown model 'nope'"),
    ):
        result = dpig("models", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output


# ------------------------------------------------------------------------------------------------
# bad input: exit code 2, one line naming the field, nothing written


def _poses(tmp_path: Path, rcv: list[list[float]]) -> Path:
    path = tmp_path / "bad_poses.json"
    data = {"format": "dpig-poses/1", "height": H, "width": W, "poses": [{"id": "p", "rcv": rcv}]}
    path.write_text(json.dumps(data))
    return path


def _good_rcv() -> list[list[float]]:
    rcv = np.zeros((18, 3))
    rcv[:, 0], rcv[:, 1], rcv[:, 2] = np.linspace(2, 28, 18), 8, 1
    out: list[list[float]] = rcv.tolist()
    return out


def _with(rcv: list[list[float]], k: int, point: list[float]) -> list[list[float]]:
    rcv = [list(p) for p in rcv]
    rcv[k] = point
    return rcv


BAD_INPUTS: dict[str, tuple[Any, str]] = {
    "17 keypoints": (
        lambda t, p: ["--pose-grid", _poses(t, _good_rcv()[:17]), "--images", p],
        "poses: bad_poses.json: pose 0 ('p'): pose must have 18 keypoints (COCO-18), got 17",
    ),
    "NaN keypoint": (
        lambda t, p: [
            "--pose-grid",
            _poses(t, _with(_good_rcv(), 3, [np.nan, 1, 1])),
            "--images",
            p,
        ],
        "poses: bad_poses.json: pose 0 ('p'): keypoint 3 (r_elbow) is not a finite number",
    ),
    "out of frame": (
        lambda t, p: ["--pose-grid", _poses(t, _with(_good_rcv(), 5, [40, 3, 1])), "--images", p],
        "outside the 32x16 frame",
    ),
    "missing poses file": (
        lambda t, p: ["--pose-grid", t / "none.json", "--images", p],
        "poses: none.json: no such file",
    ),
    "poses file not JSON": (
        lambda t, p: ["--pose-grid", _text(t / "p.json", "{oops"), "--images", p],
        "poses: p.json: not valid JSON",
    ),
    "missing images folder": (
        lambda t, p: ["--pose-grid", _poses(t, _good_rcv()), "--images", t / "nowhere"],
        "images: ",
    ),
    "S3 images in embedded mode": (
        lambda t, p: ["--pose-grid", _poses(t, _good_rcv()), "--images", "s3://bucket/photos/"],
        "is outside the allowed source prefixes",
    ),
    "http images": (
        lambda t, p: ["--pose-grid", _poses(t, _good_rcv()), "--images", "https://x.org/a/"],
        "images: 'https://x.org/a/' uses scheme 'https'",
    ),
    "zero max sources": (
        lambda t, p: ["--pose-grid", _poses(t, _good_rcv()), "--images", p, "--max-sources", 0],
        "max_sources: Input should be greater than or equal to 1",
    ),
    "bad layout": (
        lambda t, p: ["--pose-grid", _poses(t, _good_rcv()), "--images", p, "--layout", "zip"],
        "layout: Input should be 'webdataset' or 'files'",
    ),
    "bad pose size": (
        lambda t, p: ["--pose-grid", _poses(t, _good_rcv()), "--images", p, "--pose-size", "9"],
        "pose-size: expected HEIGHTxWIDTH",
    ),
    "unknown model": (
        lambda t, p: ["sample", "--count", 2, "--model", "nope"],
        "model: unknown model 'nope' (see `dpig models list`)",
    ),
    "zero count": (
        lambda t, p: ["sample", "--count", 0],
        "count: Input should be greater than or equal to 1",
    ),
    "absurd count": (
        lambda t, p: ["sample", "--count", 10**9],
        "total_items: 1000000000 items exceed the quota of 10000000",
    ),
    "half a Virtual Market": (
        lambda t, p: ["sample", "--identities", 3],
        "identities and per_identity go together",
    ),
    "zero chunk size": (
        lambda t, p: ["sample", "--count", 2, "--chunk-size", 0],
        "chunk_size: Input should be greater than or equal to 1",
    ),
    "missing swap image": (
        lambda t, p: ["swap", "--fg", t / "none.png", "--pose", t / "none.png"],
        "items.0.fg: ",
    ),
    "interpolate one step": (
        lambda t, p: ["interpolate", "--a", _first(p), "--b", _first(p), "--steps", 1],
        "steps: Input should be greater than or equal to 2",
    ),
    "unknown interpolation": (
        lambda t, p: ["interpolate", "--a", _first(p), "--b", _first(p), "--method", "cubic"],
        "method: Input should be 'linear', 'slerp' or 'inverse'",
    ),
}


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(
    case: str, home: Path, people: Path, tmp_path: Path
) -> None:
    make_args, message = BAD_INPUTS[case]
    result = dpig("submit", *make_args(tmp_path, people / "bounding_box_train"))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: "), line
    assert message in line
    assert ok("list") == []
    jobs = home / "outputs" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())


def test_unknown_job_exits_2(home: Path) -> None:
    for command in ("status", "watch", "cancel", "pause", "resume", "retry"):
        result = dpig(command, "01a21300-0000-7000-8000-000000000000")
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.strip() == "error: job 01a21300-0000-7000-8000-000000000000 not found"
    result = dpig("download", "nope", home / "x")
    assert result.exit_code == 2 and "not found" in result.stderr


def test_submit_without_a_kind_explains(home: Path) -> None:
    result = dpig("submit")
    assert result.exit_code == 2 and "--pose-grid POSES_FILE" in result.stderr


# ------------------------------------------------------------------------------------------------
# API mode: the same commands over HTTP (uvicorn in a thread, SQLite, a local output folder)


@pytest.fixture
def api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, people: Path
) -> Iterator[dict[str, Any]]:
    """A running API; DPIG_API_URL and DPIG_API_KEY point the CLI at it. `worker` runs a job's
    chunks the way a Celery worker would (there is no broker here)."""
    import socket
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")
    from service.api import create_app
    from service.db import ApiKey
    from service.db.keys import new_api_key
    from service.executor import PipelineCache
    from service.jobs import open_context, tenant_id
    from service.runner import run_job
    from service.settings import Settings

    for name in ("DPIG_DATABASE_URL", "DPIG_STORAGE_URL", "DPIG_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPIG_MODEL", str(tiny_weights))
    server_home = tmp_path / "server"
    settings = Settings.from_values(
        home=server_home,
        storage_url=(server_home / "outputs").as_uri(),
        allowed_source_prefixes=[people.as_uri()],
    )
    settings.ensure_dirs()
    ctx = open_context(settings)
    clear, prefix, key_hash = new_api_key()
    with ctx.session() as session:
        session.add(ApiKey(tenant_id=tenant_id(ctx, "alice"), prefix=prefix, key_hash=key_hash))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    monkeypatch.setenv("DPIG_HOME", str(tmp_path / "client"))
    monkeypatch.setenv("DPIG_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("DPIG_API_KEY", clear)
    get_settings.cache_clear()
    pipes = PipelineCache()
    try:
        yield {
            "outputs": server_home / "outputs" / "jobs",
            "worker": lambda job_id: run_job(ctx, job_id, pipes),
            "ctx": ctx,
        }
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        ctx.sessions.kw["bind"].dispose()
        get_settings.cache_clear()


def test_api_mode_submit_watch_download(api: dict[str, Any], tmp_path: Path) -> None:
    job = ok("submit", "sample", "--count", 3, "--chunk-size", 2, "--detach")
    assert set(job) == JOB_FIELDS and job["state"] == "queued"
    assert [j["id"] for j in ok("list")] == [job["id"]]
    assert ok("status", job["id"])["total_items"] == 3
    assert [m["name"] for m in ok("models", "list")] == ["default"]

    api["worker"](job["id"])  # what a worker does with the queued chunks
    watched = ok("watch", job["id"])
    assert (watched["state"], watched["done_items"]) == ("completed", 3)
    result = ok("download", job["id"], tmp_path / "copy")
    source = api["outputs"] / job["id"]
    assert result["files"] == sum(1 for p in source.rglob("*") if p.is_file())
    assert (tmp_path / "copy" / "shards" / "000001-1.tar").read_bytes() == (
        source / "shards" / "000001-1.tar"
    ).read_bytes()


def test_api_mode_resume_follows_the_job_and_exits_with_its_outcome(api: dict[str, Any]) -> None:
    import threading
    import time

    from service import jobs

    job = ok("submit", "sample", "--count", 2, "--detach")
    assert ok("pause", job["id"])["state"] == "paused"
    ctx = api["ctx"]

    def cancel_once_resumed() -> None:  # another client cancels while `resume` follows the job
        while jobs.job_state(ctx, job["id"]) == "paused":
            time.sleep(0.05)
        jobs.cancel(ctx, jobs.job_row(ctx, job["id"]).tenant_id, job["id"])
        jobs.maybe_finalize(ctx, job["id"])  # the dispatcher's part; nothing runs here

    canceller = threading.Thread(target=cancel_once_resumed)
    canceller.start()
    try:
        followed = ended(exit_codes.CANCELLED, "resume", job["id"])
    finally:
        canceller.join(timeout=30)
    assert followed["state"] == "cancelled"


def test_api_mode_bad_input_is_the_servers_422(
    api: dict[str, Any], people: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poses = pose_file(people, tmp_path / "poses.json", 1)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(records(people)[0].path, photos / "a.jpg")
    for images, message in (
        ("s3://elsewhere/photos/", "images: 's3://elsewhere/photos/' is outside the allowed"),
        (str(photos), "is outside the allowed source prefixes"),
    ):
        result = dpig("submit", "--pose-grid", poses, "--images", images, "--detach")
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert message in line and line.endswith("(HTTP 422)") and "\n" not in line
    result = dpig("submit", "sample", "--count", 0)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: count: Input should be greater than or equal to 1 (HTTP 422)"
    )
    assert ok("list") == [] and not api["outputs"].exists()

    monkeypatch.setenv("DPIG_API_KEY", "not-a-key-at-all")
    result = dpig("list")
    assert result.exit_code == 2 and "invalid or revoked API key (HTTP 401)" in result.stderr


def test_format_picks_the_image_format_and_bad_values_are_refused(
    home: Path, people: Path, tmp_path: Path
) -> None:
    import webdataset as wds

    job = grid(people, tmp_path, "--format", "webp:lossless")
    assert spec_of(job)["output"] == {
        "format": "webp", "lossless": True, "quality": None, "compress_level": None,
    }  # fmt: skip
    folder = job_dir(home, job)
    manifest = pq.read_table(folder / "manifest.parquet").to_pylist()
    assert all(r["object"].endswith(".webp") for r in manifest)
    tars = sorted(str(p) for p in (folder / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 6 and samples[0]["webp"].shape == (H, W, 3)
    refused = dpig("submit", "sample", "--count", 2, "--format", "png:12")
    assert refused.exit_code == 2 and "output.compress_level" in refused.output
    assert "less than or equal to 9" in refused.output


# ------------------------------------------------------------------------------------------------
# exit codes (docs/jobs.md, "Exit codes")


def broken_grid(people: Path, tmp_path: Path, *, broken: int, good: int = 0) -> list[Any]:
    """`dpig submit --pose-grid` args over `good` real sources and `broken` unreadable ones,
    all with keypoints: one pose, so one item per source."""
    chosen = records(people)[: good + 1]
    folder = tmp_path / "sources"
    folder.mkdir()
    entries = []
    for record in chosen[:good]:
        shutil.copyfile(record.path, folder / record.path.name)
        entries.append((record.path.name, record.rcv))
    for i in range(broken):
        (folder / f"zz_broken{i}.jpg").write_bytes(b"not an image")
        entries.append((f"zz_broken{i}.jpg", chosen[-1].rcv))
    write_pose_file(tmp_path / "keypoints.json", entries, H, W)
    poses = pose_file(people, tmp_path / "poses.json", 1)
    return ["submit", "--pose-grid", poses, "--images", folder, "--keypoints",
            tmp_path / "keypoints.json"]  # fmt: skip


def test_a_job_whose_items_all_failed_exits_failed(
    home: Path, people: Path, tmp_path: Path
) -> None:
    args = broken_grid(people, tmp_path, broken=3)
    result = dpig(*args)
    assert result.exit_code == exit_codes.FAILED == 4, result.output
    job = ok("list")[0]
    assert (job["state"], job["done_items"], job["failed_items"]) == ("failed", 0, 3)
    # no image was made: no rate, neither in the summary nor in the view
    assert job["images_per_second"] == 0.0
    assert "images/s" not in result.stdout
    assert ended(exit_codes.FAILED, "watch", job["id"])["state"] == "failed"
    assert ended(exit_codes.FAILED, "retry", job["id"])["state"] == "failed"
    # --detach follows nothing: the job was queued, exit 0
    assert ok("retry", job["id"], "--detach")["state"] == "queued"


def test_completed_with_failures_cancelled_and_paused_exit_codes(
    home: Path, people: Path, tmp_path: Path
) -> None:
    args = broken_grid(people, tmp_path, broken=1, good=1)
    job = ended(exit_codes.COMPLETED_WITH_FAILURES, *args)
    assert (job["state"], job["done_items"], job["failed_items"]) == ("completed", 1, 1)
    assert ended(3, "watch", job["id"])["state"] == "completed"

    queued = ok("submit", "sample", "--count", 2, "--detach")
    assert ok("pause", queued["id"])["state"] == "paused"
    assert ended(exit_codes.PAUSED, "watch", queued["id"])["state"] == "paused"
    assert ended(exit_codes.OK, "resume", queued["id"])["state"] == "completed"

    doomed = ok("submit", "sample", "--count", 2, "--detach")
    assert ok("cancel", doomed["id"])["state"] == "cancelled"
    assert ended(exit_codes.CANCELLED, "watch", doomed["id"])["state"] == "cancelled"


def test_exit_codes_are_distinct_per_outcome() -> None:
    def view(state: str, failed: int = 0) -> dict[str, Any]:
        return {"state": state, "failed_items": failed}

    codes = {
        "completed": exit_codes.for_job(view("completed")),
        "completed with failures": exit_codes.for_job(view("completed", 1)),
        "failed": exit_codes.for_job(view("failed", 3)),
        "cancelled": exit_codes.for_job(view("cancelled")),
        "expired": exit_codes.for_job(view("expired")),
        "paused": exit_codes.for_job(view("paused")),
    }
    assert codes == {
        "completed": 0,
        "completed with failures": 3,
        "failed": 4,
        "cancelled": 5,
        "expired": 6,
        "paused": 7,
    }
    assert exit_codes.REFUSED not in codes.values()


def test_pose_grid_without_keypoints_or_estimator_is_refused(
    home: Path, people: Path, tmp_path: Path
) -> None:
    from dpig_core.data.pose_estimation import estimator_installed

    assert not estimator_installed()  # the test environment has no mediapipe
    folder = tmp_path / "photos"  # photos, no annotations
    folder.mkdir()
    for record in records(people)[:2]:
        shutil.copyfile(record.path, folder / record.path.name)
    poses = pose_file(people, tmp_path / "poses.json", 1)
    result = dpig("submit", "--pose-grid", poses, "--images", folder)
    assert result.exit_code == exit_codes.REFUSED, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: source_keypoints: 2 of 2 source images have no keypoints")
    assert "--keypoints FILE" in message and "pip install 'dpig[pose]'" in message
    assert ok("list") == []  # nothing was written


def test_progress_bar_counts_only_images_made() -> None:
    from cli.job_output import JobBar, RateColumn

    job = {"id": "j" * 13, "kind": "pose_grid", "state": "queued"}
    with JobBar(job) as bar:
        assert bar.progress is not None
        advance = bar.running(4)
        for _ in range(3):
            advance(1, 0)  # a failed item
        task = bar.progress.tasks[0]
        assert (task.completed, task.fields["rate"]) == (3, 0)
        assert str(RateColumn().render(task)) == "- images/s"
        advance(1, 1)
        assert task.completed == 4 and task.fields["rate"] > 0


# ------------------------------------------------------------------------------------------------
# custom_id


def test_custom_ids_round_trip_and_duplicates_are_refused(
    home: Path, people: Path, tmp_path: Path
) -> None:
    import webdataset as wds

    a, b = (str(r.path) for r in records(people)[:2])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    keypoints = tmp_path / "keypoints.json"
    write_pose_file(keypoints, [("broken.jpg", records(people)[0].rcv)], H, W)
    rows = tmp_path / "items.json"
    rows.write_text(json.dumps([
        {"fg": a, "pose": b, "custom_id": "req-0"},
        {"fg": b, "pose": a},
        {"fg": str(broken), "pose": a, "custom_id": "req_2"},
    ]))  # fmt: skip
    job = ended(3, "submit", "swap", "--from-file", rows, "--keypoints", keypoints)
    out = job_dir(home, job)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["custom_id"] for r in manifest] == ["req-0", None, "req_2"]
    samples = list(
        wds.WebDataset(str(next((out / "shards").glob("000000-*.tar"))), shardshuffle=False)
    )
    assert [json.loads(s["json"])["custom_id"] for s in samples] == ["req-0", None]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["item"], e["custom_id"]) for e in errors] == [(2, "req_2")]

    job = ok("submit", "interpolate", "--a", a, "--b", b, "--steps", 2, "--custom-id", "walk-7")
    rows_out = pq.read_table(job_dir(home, job) / "manifest.parquet").to_pylist()
    assert [r["custom_id"] for r in rows_out] == ["walk-7", "walk-7"]

    ids = tmp_path / "ids.json"
    names = [r.path.name for r in records(people)[:2]]
    ids.write_text(json.dumps({names[0]: "src-A", names[1]: "src-B"}))
    job = grid(people, tmp_path, "--max-sources", 2, "--custom-ids", ids)
    rows_out = pq.read_table(job_dir(home, job) / "manifest.parquet").to_pylist()
    assert [(r["source"], r["custom_id"]) for r in rows_out] == [
        (names[0], "src-A"),
        (names[0], "src-A"),
        (names[1], "src-B"),
        (names[1], "src-B"),
    ]

    jobs_before = len(ok("list"))
    rows.write_text(json.dumps([{"fg": a, "pose": b, "custom_id": "x"}] * 2))
    twice = dpig("submit", "swap", "--from-file", rows)
    assert twice.exit_code == 2
    assert "items: Value error, custom_id 'x' is given twice (at 0 and 1)" in twice.stderr
    bad = dpig("submit", "interpolate", "--a", a, "--b", b, "--custom-id", "no spaces")
    assert bad.exit_code == 2 and "pairs.0.custom_id" in bad.stderr
    ids.write_text(json.dumps({"nobody.jpg": "z"}))
    unknown = dpig("submit", "--pose-grid", tmp_path / "poses.json", "--images",
                   people / "bounding_box_train", "--custom-ids", ids)  # fmt: skip
    assert unknown.exit_code == 2 and "source_custom_ids: 1 keys name no source" in unknown.stderr
    assert len(ok("list")) == jobs_before  # nothing was written


def test_expired_job_exits_6_and_status_shows_expiry_and_retention(home: Path) -> None:
    from datetime import datetime

    from service.jobs import open_context
    from service.retention import expire_due

    job = ok("submit", "sample", "--count", 4, "--chunk-size", 2, "--expires-after", 60,
             "--retain-days", 7, "--detach")  # fmt: skip
    assert job["retain_days"] == 7 and job["expires_at"] is not None
    shown = dpig("status", job["id"])
    assert "retained  7 days" in shown.stdout and "expires  " in shown.stdout
    ctx = open_context(get_settings(), embedded=True)
    assert expire_due(ctx, now=datetime.fromisoformat(job["expires_at"])) == 1
    expired = ended(exit_codes.EXPIRED, "watch", job["id"])
    assert (expired["state"], expired["done_items"], expired["failed_items"]) == ("expired", 0, 0)
    rows = pq.read_table(job_dir(home, job) / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["expired"] * 4
    bad = dpig("submit", "sample", "--count", 1, "--expires-after", 5)
    assert bad.exit_code == 2 and "expires_after: Input should be greater than or equal to 60" in (
        bad.stderr
    )


def test_pose_grid_without_keypoints_is_accepted_where_the_workers_estimate(
    home: Path, people: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copyfile(records(people)[0].path, folder / "a.png")
    poses = pose_file(people, tmp_path / "poses.json", 1)
    monkeypatch.setenv("DPIG_POSE_ESTIMATOR_INSTALLED", "true")  # the operator says so
    get_settings.cache_clear()
    job = ok("submit", "--pose-grid", poses, "--images", folder, "--detach")
    assert (job["state"], job["total_items"]) == ("queued", 1)
