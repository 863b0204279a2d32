"""`dpig demo`: the bundled model at work through the job service, offline, with no servers.

Always on the embedded default (SQLite + a local folder under `DPIG_HOME`, jobs run in this
process), whatever `DPIG_API_URL` says: the demo's source images are local files. It runs

- a `sample` job: a Virtual Market of identities × images (one foreground per identity, pose and
  background sampled through Φ), and
- a `pose_grid` job: synthetic source people (written once to `DPIG_HOME/demo-data` at the model's
  size) × target poses taken from other synthetic people,

both with layout webdataset, then builds a contact sheet PNG of each from the job outputs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from cli.client import ClientError, EmbeddedClient
from cli.errors import fail

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "dpig-market-small-synth"


def default_home() -> Path:
    return Path(os.environ.get("DPIG_HOME", Path.home() / ".dpig"))


def default_model() -> Path:
    return Path(os.environ.get("DPIG_MODEL", BUNDLED_MODEL))


# ------------------------------------------------------------------------------------------------
# demo inputs


def demo_people(home: Path, height: int, width: int, sources: int, poses: int, seed: int) -> Path:
    """Synthetic Market-1501 people (2 images per identity) for `sources` + `poses` identities,
    written once per size and seed to `home/demo-data` and reused after."""
    folder = home / "demo-data" / f"{height}x{width}-seed{seed}-{sources}x{poses}"
    people = folder / "people"
    if (people / "synth.json").is_file():
        return folder
    from dpig_core.data.synth import write_market_dataset

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".people-", dir=folder))
    try:
        write_market_dataset(
            tmp, identities=sources + poses, per_identity=2, height=height, width=width,
            seed=seed, test_fraction=0.0, query_per_identity=0, progress=False,
        )  # fmt: skip
        shutil.rmtree(people, ignore_errors=True)
        os.replace(tmp, people)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def demo_inputs(folder: Path, sources: int, poses: int, height: int, width: int) -> dict[str, Any]:
    """The first image of the first `sources` identities, copied to `sources/`, and the poses of
    the next `poses` identities in `poses.json` (dpig-poses/1)."""
    from dpig_core.data.pose_files import write_pose_file
    from dpig_core.data.readers import read_dataset

    people = folder / "people"
    first: dict[str, Any] = {}
    for record in sorted(read_dataset(people).records, key=lambda r: r.path.name):
        if record.rcv is not None:
            first.setdefault(record.identity, record)
    chosen = [first[k] for k in sorted(first)]
    if len(chosen) < sources + poses:
        raise ValueError(f"{people} holds {len(chosen)} annotated people, need {sources + poses}")
    source_dir = folder / "sources"
    shutil.rmtree(source_dir, ignore_errors=True)
    source_dir.mkdir()
    for record in chosen[:sources]:
        shutil.copyfile(record.path, source_dir / record.path.name)
    pose_file = folder / "poses.json"
    targets = chosen[sources : sources + poses]
    write_pose_file(pose_file, [(r.path.name, r.rcv) for r in targets], height, width)
    return {
        "sources": source_dir,
        "poses": pose_file,
        "keypoints": people / "market-annotation-train.csv",
    }


# ------------------------------------------------------------------------------------------------
# contact sheets from job outputs


def job_images(job_dir: Path) -> dict[int, Any]:
    """Item → uint8 image of every generated item of a finished job folder (either layout)."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(job_dir / "manifest.parquet").to_pylist()
    tars: dict[str, tarfile.TarFile] = {}
    out: dict[int, Any] = {}
    try:
        for row in rows:
            if row["status"] != "ok" or not row["object"]:
                continue
            obj = str(row["object"])
            if "#" in obj:
                shard, member = obj.split("#", 1)
                if shard not in tars:
                    tars[shard] = tarfile.open(job_dir / shard)
                handle = tars[shard].extractfile(member)
                assert handle is not None
                data = handle.read()
            else:
                data = (job_dir / obj).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                out[int(row["item"])] = np.asarray(image.convert("RGB"))
    finally:
        for tar in tars.values():
            tar.close()
    return out


def _read_rgb(path: Path, height: int, width: int) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(rgb)


def sample_sheet(job_dir: Path, identities: int, per_identity: int, out: Path) -> Path:
    """Rows: identities; columns: that identity's images."""
    from dpig_core.imaging import contact_sheet, save_png

    images = job_images(job_dir)
    rows = [
        [images.get(i * per_identity + j) for j in range(per_identity)] for i in range(identities)
    ]
    return save_png(out, contact_sheet(rows, scale=3))


def pose_grid_sheet(
    job_dir: Path, spec: dict[str, Any], sources_dir: Path, height: int, width: int, out: Path
) -> Path:
    """A header row of pose skeletons; then per source its image and its images in every pose."""
    import numpy as np

    from dpig_core.data.pose_files import rescale_rcv
    from dpig_core.imaging import contact_sheet, save_png, skeleton

    images = job_images(job_dir)
    sources: list[str] = json.loads((job_dir / "inputs" / "sources.json").read_text())
    poses = spec["poses"]
    header: list[Any] = [None]
    for pose in poses:
        rcv = rescale_rcv(
            np.asarray(pose["keypoints"], np.float32),
            (pose["height"], pose["width"]),
            (height, width),
        )
        header.append(skeleton(rcv, height, width))
    rows = [header]
    for s, key in enumerate(sources):
        row = [_read_rgb(sources_dir / key, height, width)]
        row += [images.get(s * len(poses) + p) for p in range(len(poses))]
        rows.append(row)
    return save_png(out, contact_sheet(rows, scale=3))


# ------------------------------------------------------------------------------------------------


def _weights_name(info: dict[str, Any]) -> str:
    try:
        return str(json.loads((Path(info["path"]) / "manifest.json").read_text())["name"])
    except (OSError, ValueError, KeyError):
        return "?"


def _job_dir(job: dict[str, Any]) -> Path:
    from cli.job_output import local_path

    where = local_path(job.get("output_uri"))
    assert where is not None
    return Path(where)


def _run(client: EmbeddedClient, spec: dict[str, Any], quiet: bool) -> tuple[dict[str, Any], float]:
    from cli.job_output import follow

    started = time.perf_counter()
    job = client.submit(spec, wait=False)
    job = follow(client, job, quiet=quiet)
    if job["state"] != "completed":
        fail(f"{job['kind']} job {job['id']} ended {job['state']}: {job.get('error') or ''}")
    return job, time.perf_counter() - started


def demo(
    model: str = typer.Option(
        "default", "--model", help="Model name (default: the bundled model, or $DPIG_MODEL)."
    ),
    out: Path = typer.Option(None, help="Folder of the contact sheets (default: $DPIG_HOME/demo)."),
    sources: int = typer.Option(6, min=1, max=64, help="Source people of the pose grid."),
    poses: int = typer.Option(8, min=1, max=64, help="Target poses of the pose grid."),
    identities: int = typer.Option(6, min=1, max=64, help="Sampled identities."),
    per_identity: int = typer.Option(8, min=1, max=64, help="Images per sampled identity."),
    seed: int = typer.Option(0, min=0, help="Seed of the synthetic people and of the noise."),
    as_json: bool = typer.Option(False, "--json", help="Print the jobs and paths as JSON."),
) -> None:
    """Run a sample job and a pose-grid job with the bundled model and write contact sheets.

    Embedded default only (no servers; DPIG_API_URL is ignored): jobs run in this process, and
    their outputs land in $DPIG_HOME/outputs/jobs/<job id>/.
    """
    from cli.job_specs import pose_grid_spec

    console = Console(stderr=as_json, soft_wrap=True, highlight=False)
    if os.environ.get("DPIG_API_URL") and not as_json:
        console.print("note: the demo runs on the embedded default; DPIG_API_URL is not used")
    client = EmbeddedClient()
    try:
        info = client.model_info(model)
        height, width = int(info["config"]["height"]), int(info["config"]["width"])
        home = client.settings.home
        out = out or home / "demo"
        try:
            folder = demo_people(home, height, width, sources, poses, seed)
            inputs = demo_inputs(folder, sources, poses, height, width)
        except (OSError, ValueError) as exc:
            fail(f"demo data: {exc}")
        sample_spec = {
            "kind": "sample",
            "identities": identities,
            "per_identity": per_identity,
            "model": model,
            "seed": seed,
            "layout": "webdataset",
        }
        sample_job, sample_s = _run(client, sample_spec, as_json)
        grid_spec = pose_grid_spec(
            client,
            poses_file=inputs["poses"],
            images=str(inputs["sources"]),
            keypoints=inputs["keypoints"],
            model=model,
            seed=seed,
            layout="webdataset",
        )
        grid_job, grid_s = _run(client, grid_spec, as_json)
    except ClientError as exc:
        fail(str(exc))
    finally:
        client.close()
    out.mkdir(parents=True, exist_ok=True)
    sample_png = sample_sheet(_job_dir(sample_job), identities, per_identity, out / "samples.png")
    grid_png = pose_grid_sheet(
        _job_dir(grid_job),
        grid_spec,
        inputs["sources"],
        height,
        width,
        out / "pose_grid.png",
    )
    result = {
        "model": {k: info[k] for k in ("name", "version", "path", "resolution")},
        "sample": {
            "job": sample_job,
            "images": str(_job_dir(sample_job)),
            "contact_sheet": str(sample_png),
            "seconds": round(sample_s, 2),
        },
        "pose_grid": {
            "job": grid_job,
            "images": str(_job_dir(grid_job)),
            "sources": str(inputs["sources"]),
            "contact_sheet": str(grid_png),
            "seconds": round(grid_s, 2),
        },
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(
        f"model: {info['name']} = {_weights_name(info)} {info['version']} "
        f"({info['resolution']}) at {info['path']}"
    )
    console.print(
        f"sample job {sample_job['id']}: {sample_job['done_items']} images "
        f"({identities} identities × {per_identity}) in {sample_s:.1f} s"
    )
    console.print(f"  images: [cyan]{_job_dir(sample_job)}[/] (shards/*.tar, manifest.parquet)")
    console.print(f"  contact sheet: [cyan]{sample_png}")
    console.print(
        f"pose_grid job {grid_job['id']}: {grid_job['done_items']} images "
        f"({sources} sources × {poses} poses) in {grid_s:.1f} s"
    )
    console.print(f"  images: [cyan]{_job_dir(grid_job)}[/] (sources: {inputs['sources']})")
    console.print(f"  contact sheet: [cyan]{grid_png}")
