"""`dpig export JOB --format coco|market|files --out DIR`: a finished job's images and labels as a
dataset (docs/jobs.md, "Export").

It streams: shard by shard (each fetched to a temporary file, read, then deleted), item by item,
into a `dpig_core.data.writers` writer, so memory does not grow with the job. Only committed shards
(those with a `.done.json` marker) and items that were made are exported. The job is read through
the same client as `dpig download`, so it sees only the caller's own jobs.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from cli.client import JobClient
from cli.errors import fail

EXPORTABLE_STATES = ("completed", "failed", "cancelled", "expired")
FORMATS = ("coco", "market", "files")


MARKERS = ("_SUCCESS", "_FAILED", "_CANCELLED", "_EXPIRED")


def _shards(
    client: JobClient, outputs: list[dict[str, str]], tmp: Path
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The committed shard names (`shards/000000-1`) in order, and the outputs by key. The
    finaliser's marker lists them; a stale worker's upload after finalisation sits beside them
    under its own attempt's keys and is not one of them."""
    by_key = {o["key"]: o for o in outputs}
    for marker in MARKERS:
        if marker in by_key:
            listed = json.loads(_fetch(client, by_key[marker], tmp).read_text()).get("shards")
            if listed is not None:
                return sorted(listed), by_key
    # a job finalised before markers listed its shards: every done marker is a committed one
    names = sorted(k.removesuffix(".done.json") for k in by_key if k.endswith(".done.json"))
    return names, by_key


def _fetch(client: JobClient, output: dict[str, str], tmp: Path) -> Path:
    target = tmp / "object"
    client.fetch(output, target)
    return target


def _tar_items(path: Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(png, meta) pairs of a WebDataset shard, read as a stream (the writer puts each item's
    `.png` right before its `.json`)."""
    png: bytes | None = None
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            handle = tar.extractfile(member)
            if handle is None:
                continue
            data = handle.read()
            if member.name.endswith((".png", ".webp", ".jpg")):  # the job's output format
                png = data
            elif member.name.endswith(".json") and png is not None:
                yield png, json.loads(data)
                png = None


def _files_items(
    client: JobClient, path: Path, by_key: dict[str, dict[str, str]], tmp: Path
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(png, meta) of a `layout=files` shard: its parquet rows, each image fetched alone."""
    import pyarrow.parquet as pq

    for row in pq.read_table(path).to_pylist():
        if row["status"] != "ok" or row["object"] not in by_key:
            continue
        image = _fetch(client, by_key[row["object"]], tmp).read_bytes()
        labels = row.get("labels")
        meta = {k: v for k, v in row.items() if v is not None and k not in ("status", "error")}
        if labels is not None:
            meta["labels"] = json.loads(labels)
        yield image, meta


def iter_items(client: JobClient, job_id: str) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Every made item of a settled job, in item order: (png, meta)."""
    job = client.get(job_id)
    if job["state"] not in EXPORTABLE_STATES:
        fail(
            f"export: job {job_id} is {job['state']}; export a job once it has settled "
            f"({', '.join(EXPORTABLE_STATES)})"
        )
    with tempfile.TemporaryDirectory(prefix="dpig-export-") as folder:
        tmp = Path(folder)
        names, by_key = _shards(client, client.outputs(job_id), tmp)
        for name in names:
            if f"{name}.tar" in by_key:
                yield from _tar_items(_fetch(client, by_key[f"{name}.tar"], tmp))
            elif f"{name}.parquet" in by_key:
                path = _fetch(client, by_key[f"{name}.parquet"], tmp)
                shard = tmp / "shard.parquet"
                path.replace(shard)
                yield from _files_items(client, shard, by_key, tmp)


def export_job(client: JobClient, job_id: str, fmt: str, out: Path) -> dict[str, Any]:
    """Write the job as a `fmt` dataset under `out`; returns the writer's summary."""
    from dpig_core.data.writers import WRITERS, DatasetWriter, ExportError

    if fmt not in WRITERS:
        fail(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.exists() and any(out.iterdir()):
        fail(f"out: {out} is not empty")
    writer: DatasetWriter | None = None
    try:
        for png, meta in iter_items(client, job_id):
            if writer is None:
                writer = WRITERS[fmt](out)
            writer.add(png, meta)
    except ExportError as exc:
        fail(str(exc))
    if writer is None:
        fail(f"export: job {job_id} has no images")
    return {"job": job_id, "format": fmt, "out": str(out), **writer.close()}


def export(
    job_id: str = typer.Argument(..., metavar="JOB"),
    fmt: str = typer.Option(..., "--format", help="coco, market or files."),
    out: Path = typer.Option(..., "--out", help="An empty or new folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Export a settled job's images and labels as a dataset: COCO keypoints (images +
    annotations/person_keypoints.json), a Market-1501 folder, or image folders + labels.jsonl."""
    from cli.job_output import open_client

    with open_client() as client:
        summary = export_job(client, job_id, fmt, out)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(f"exported {summary['images']} images of job {job_id} as {fmt} to {out}")
