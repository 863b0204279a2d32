"""`dpig submit | status | watch | list | cancel | pause | resume | retry | download | models`.

With `DPIG_API_URL` set these talk to the HTTP API; otherwise they use the embedded default
(SQLite + a local folder under `DPIG_HOME`) and run jobs in this process: `submit` runs the job
right away unless `--detach`, and `watch` runs a queued job that nobody is running. Every command
takes `--json` and then prints jobs as the API returns them. Bad input exits with code 2 and one
line naming the field and the problem, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
)
from rich.table import Table

from cli.errors import fail
from cli.job_output import (
    echo_json,
    err_console,
    exit_for,
    follow,
    interrupted,
    local_path,
    open_client,
    print_job_result,
    wide_console,
)
from cli.job_specs import ImageRefs, common_fields, output_spec, parse_frame, pose_grid_spec
from cli.output_format import FORMAT_HELP

submit_app = typer.Typer(
    help="Submit a generation job: a pose grid (--pose-grid), or sample, swap or interpolate.",
    invoke_without_command=True,
    no_args_is_help=False,
)
models_app = typer.Typer(help="Models that jobs can name.", no_args_is_help=True)

LAYOUT_HELP = "webdataset (tar shards) or files (one image per object)."
DETACH_HELP = (
    "Return once the job is queued. Embedded mode: nothing runs it until `dpig watch JOB`."
)
JSON_HELP = "Print machine-readable JSON (jobs as the API returns them)."
_EXPIRES = typer.Option(
    None, "--expires-after", help="Seconds: a job not finished by then becomes expired."
)
_RETAIN = typer.Option(
    None, "--retain-days", help="Days the outputs are kept after the job finishes."
)
_CALLBACK = typer.Option(
    None, "--callback-url", help="Called (POST, signed) when the job reaches a terminal state."
)


def register(app: typer.Typer) -> None:
    """Add the job and model commands to the `dpig` app."""
    app.add_typer(submit_app, name="submit")
    for name, command in (
        ("status", status),
        ("watch", watch),
        ("list", list_command),
        ("cancel", cancel),
        ("pause", pause),
        ("resume", resume),
        ("retry", retry),
        ("download", download),
    ):
        app.command(name)(command)
    app.add_typer(models_app, name="models")


def _submit(
    spec: dict[str, Any], *, detach: bool, as_json: bool, notes: list[str] | None = None
) -> None:
    with open_client() as client:
        job = client.submit(spec, wait=False)
        if not as_json:
            for note in notes or ():
                typer.echo(f"note: {note}", err=True)
        if not detach:
            try:
                job = follow(client, job, quiet=as_json)
            except KeyboardInterrupt:
                interrupted(job["id"])
        if as_json:
            echo_json(job)
        else:
            print_job_result(job, client.mode)
    if not detach:
        exit_for(job)


# ------------------------------------------------------------------------------------------------
# submit


@submit_app.callback()
def submit(
    ctx: typer.Context,
    pose_grid: Path | None = typer.Option(
        None,
        "--pose-grid",
        help="Poses file: dpig-poses/1, OpenPose JSON (or a folder of them), COCO keypoints or a "
        "Market-1501 keypoints CSV. Every source image is generated in every pose.",
    ),
    images: str | None = typer.Option(
        None, "--images", help="Source images: a local folder (embedded) or s3://bucket/prefix/."
    ),
    keypoints: Path | None = typer.Option(
        None,
        "--keypoints",
        help="Source keypoints: a pose file whose pose ids are image file names (default: the "
        "folder's Market-1501/DeepFashion annotations; images without keypoints are estimated).",
    ),
    pose_size: str | None = typer.Option(
        None,
        "--pose-size",
        help="HxW frame of the poses (default: the file's own, else the model's).",
    ),
    model: str = typer.Option("default", "--model", help="Model name (`dpig models list`)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every item's noise."),
    chunk_size: int | None = typer.Option(
        None, "--chunk-size", help="Items per chunk (one shard each); default 1024."
    ),
    layout: str = typer.Option("webdataset", "--layout", help=LAYOUT_HELP),
    image_format: str = typer.Option("png", "--format", help=FORMAT_HELP),
    max_sources: int | None = typer.Option(
        None, "--max-sources", help="Use only the first N source images (sorted)."
    ),
    expires_after: int | None = _EXPIRES,
    retain_days: int | None = _RETAIN,
    callback_url: str | None = _CALLBACK,
    custom_ids: Path | None = typer.Option(
        None,
        "--custom-ids",
        help='JSON object {"<source key>": "<your id>"}: every item of that source carries it.',
    ),
    detach: bool = typer.Option(False, "--detach", help=DETACH_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Submit a job. Without a subcommand: a pose grid, every source image × every pose.

    Without --detach the job runs now (embedded mode, in this process) or is followed until it
    settles (API mode), with a progress bar; then it prints where the outputs are.
    """
    if ctx.invoked_subcommand is not None:
        if pose_grid is not None or images is not None:
            fail("--pose-grid/--images make a pose-grid job; give them without a subcommand")
        return
    if pose_grid is None:
        fail(
            "give --pose-grid POSES_FILE --images DIR (a pose-grid job), or a subcommand: "
            "sample, swap, interpolate (see `dpig submit --help`)"
        )
    if images is None:
        fail("images: --images DIR_OR_S3_URI is required with --pose-grid")
    frame = parse_frame(pose_size) if pose_size is not None else None
    notes: list[str] = []
    with open_client() as client:
        spec = pose_grid_spec(
            client,
            poses_file=pose_grid,
            images=images,
            keypoints=keypoints,
            pose_size=frame,
            model=model,
            seed=seed,
            chunk_size=chunk_size,
            layout=layout,
            max_sources=max_sources,
            notes=notes,
        )
        spec["output"] = output_spec(image_format)
    if custom_ids is not None:
        spec["source_custom_ids"] = _read_custom_ids(custom_ids)
    spec |= {"expires_after": expires_after, "retain_days": retain_days}
    spec["callback_url"] = callback_url
    _submit(spec, detach=detach, as_json=as_json, notes=notes)


def _read_custom_ids(path: Path) -> dict[str, Any]:
    try:
        ids = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"custom-ids: {path}: cannot read ({exc})")
    except json.JSONDecodeError as exc:
        fail(f"custom-ids: {path}: not valid JSON ({exc.msg} at line {exc.lineno})")
    if not isinstance(ids, dict):
        fail(f'custom-ids: {path}: expected an object {{"<source key>": "<id>"}}')
    return ids


_MODEL = typer.Option("default", "--model", help="Model name (`dpig models list`).")
_SEED = typer.Option(0, "--seed", help="Seed of every item's noise.")
_CHUNK = typer.Option(None, "--chunk-size", help="Items per chunk (one shard each).")
_LAYOUT = typer.Option("webdataset", "--layout", help=LAYOUT_HELP)
_FORMAT = typer.Option("png", "--format", help=FORMAT_HELP)
_DETACH = typer.Option(False, "--detach", help=DETACH_HELP)
_JSON = typer.Option(False, "--json", help=JSON_HELP)
_KEYPOINTS = typer.Option(
    None,
    "--keypoints",
    help="Keypoints of the reference images: a pose file whose pose ids are image file names "
    "(default: the image's Market-1501/DeepFashion annotations, else estimated).",
)


@submit_app.command("sample")
def submit_sample(
    count: int | None = typer.Option(None, "--count", help="New people, every factor sampled."),
    identities: int | None = typer.Option(
        None, "--identities", help="Virtual Market: identities (with --per-identity)."
    ),
    per_identity: int | None = typer.Option(
        None, "--per-identity", help="Virtual Market: images per identity."
    ),
    fg: str | None = typer.Option(None, "--fg", help="Fix the foreground from this image."),
    bg: str | None = typer.Option(None, "--bg", help="Fix the background from this image."),
    pose: str | None = typer.Option(None, "--pose", help="Fix the pose from this image."),
    keypoints: Path | None = _KEYPOINTS,
    model: str = _MODEL,
    seed: int = _SEED,
    chunk_size: int | None = _CHUNK,
    layout: str = _LAYOUT,
    image_format: str = _FORMAT,
    expires_after: int | None = _EXPIRES,
    retain_days: int | None = _RETAIN,
    callback_url: str | None = _CALLBACK,
    detach: bool = _DETACH,
    as_json: bool = _JSON,
) -> None:
    """Sample new people: --count N, or --identities I --per-identity K (a Virtual Market).

    A Virtual Market shares one foreground per identity. --fg/--bg/--pose fix that factor from a
    reference image instead of sampling it.
    """
    spec: dict[str, Any] = {
        "kind": "sample",
        **common_fields(
            model, seed, chunk_size, layout, image_format, expires_after, retain_days, callback_url
        ),
    }
    for name, value in (("count", count), ("identities", identities)):
        if value is not None:
            spec[name] = value
    if per_identity is not None:
        spec["per_identity"] = per_identity
    with open_client() as client:
        refs = ImageRefs(client, keypoints)
        for factor, image in (("fg", fg), ("bg", bg), ("pose", pose)):
            if image is not None:
                spec[factor] = refs.ref(image, factor)
    _submit(spec, detach=detach, as_json=as_json)


def _swap_rows(path: Path) -> list[Any]:
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        fail(f"from-file: {path}: no such file")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"from-file: {path}: cannot read ({exc})")
    except json.JSONDecodeError as exc:
        fail(f"from-file: {path}: not valid JSON ({exc.msg} at line {exc.lineno})")
    if isinstance(rows, dict):
        rows = rows.get("items")
    if not isinstance(rows, list) or not rows:
        fail(f"from-file: {path}: expected a non-empty list of {{fg, bg, pose}} rows")
    return rows


@submit_app.command("swap")
def submit_swap(
    fg: str | None = typer.Option(None, "--fg", help="Image giving the foreground."),
    bg: str | None = typer.Option(None, "--bg", help="Image giving the background."),
    pose: str | None = typer.Option(None, "--pose", help="Image giving the pose."),
    from_file: Path | None = typer.Option(
        None,
        "--from-file",
        help='JSON list of rows {"fg": IMG, "bg": IMG, "pose": IMG, "custom_id": ID} (an IMG is a '
        'path, a URI or {"uri", "keypoints"}; custom_id is optional).',
    ),
    keypoints: Path | None = _KEYPOINTS,
    model: str = _MODEL,
    seed: int = _SEED,
    chunk_size: int | None = _CHUNK,
    layout: str = _LAYOUT,
    image_format: str = _FORMAT,
    expires_after: int | None = _EXPIRES,
    retain_days: int | None = _RETAIN,
    callback_url: str | None = _CALLBACK,
    detach: bool = _DETACH,
    as_json: bool = _JSON,
) -> None:
    """Recombine factors: the foreground, background and pose of three images."""
    if from_file is not None:
        if fg or bg or pose:
            fail("from-file: give either --from-file or --fg/--bg/--pose, not both")
        rows = _swap_rows(from_file)
    else:
        if fg is None or pose is None:
            fail("items: give --fg IMG and --pose IMG (and --bg IMG), or --from-file items.json")
        rows = [{"fg": fg, "bg": bg, "pose": pose}]
    items = []
    with open_client() as client:
        refs = ImageRefs(client, keypoints)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                fail(f"items.{i}: expected an object with fg, bg and pose, got {row!r}")
            unknown = set(row) - {"fg", "bg", "pose", "custom_id"}
            if unknown:
                fail(f"items.{i}: unknown fields {sorted(unknown)}")
            item = {"custom_id": row["custom_id"]} if "custom_id" in row else {}
            for factor in ("fg", "bg", "pose"):
                if row.get(factor) is None:
                    if factor != "bg":
                        fail(f"items.{i}.{factor}: missing")
                    continue
                item[factor] = refs.ref(row[factor], f"items.{i}.{factor}")
            items.append(item)
    spec = {
        "kind": "swap",
        "items": items,
        **common_fields(
            model, seed, chunk_size, layout, image_format, expires_after, retain_days, callback_url
        ),
    }
    _submit(spec, detach=detach, as_json=as_json)


@submit_app.command("interpolate")
def submit_interpolate(
    a: str = typer.Option(..., "--a", help="First image."),
    b: str = typer.Option(..., "--b", help="Second image."),
    steps: int = typer.Option(8, "--steps", help="Images from a to b, both included."),
    method: str = typer.Option(
        "linear", "--method", help="linear or slerp (embeddings), or inverse (through Φ's z)."
    ),
    factors: str = typer.Option(
        "fg,bg,pose", "--factors", help="Comma-separated factors to interpolate."
    ),
    custom_id: str | None = typer.Option(
        None, "--custom-id", help="Your id for this request (1-64 of A-Z a-z 0-9 _ -)."
    ),
    keypoints: Path | None = _KEYPOINTS,
    model: str = _MODEL,
    seed: int = _SEED,
    chunk_size: int | None = _CHUNK,
    layout: str = _LAYOUT,
    image_format: str = _FORMAT,
    expires_after: int | None = _EXPIRES,
    retain_days: int | None = _RETAIN,
    callback_url: str | None = _CALLBACK,
    detach: bool = _DETACH,
    as_json: bool = _JSON,
) -> None:
    """Interpolate between two people, factor by factor."""
    with open_client() as client:
        refs = ImageRefs(client, keypoints)
        pair = {"a": refs.ref(a, "a"), "b": refs.ref(b, "b"), "custom_id": custom_id}
    spec = {
        "kind": "interpolate",
        "pairs": [pair],
        "steps": steps,
        "method": method,
        "factors": [f.strip() for f in factors.split(",") if f.strip()],
        **common_fields(
            model, seed, chunk_size, layout, image_format, expires_after, retain_days, callback_url
        ),
    }
    _submit(spec, detach=detach, as_json=as_json)


# ------------------------------------------------------------------------------------------------
# status, watch, list, control


def _print_status(job: dict[str, Any]) -> None:
    console = Console(highlight=False, soft_wrap=True)
    finished = job["done_items"] + job["failed_items"]
    rows = [
        ("job", job["id"]),
        ("kind", job["kind"]),
        ("state", job["state"]),
        ("model", job["model"]),
        (
            "items",
            f"{finished}/{job['total_items']} ({job['done_items']} done, "
            f"{job['failed_items']} failed, {job['running_items']} running)",
        ),
        ("images/s", job.get("images_per_second")),
        ("eta", f"{job['eta_seconds']:g} s" if job.get("eta_seconds") is not None else None),
        ("created", job.get("created_at")),
        ("started", job.get("started_at")),
        ("finished", job.get("finished_at")),
        ("expires", job.get("expires_at")),
        ("retained", f"{job['retain_days']} days" if job.get("retain_days") else None),
        ("deleted", job.get("deleted_at")),
        ("outputs", local_path(job.get("output_uri"))),
        ("error", job.get("error")),
    ]
    for name, value in rows:
        if value is not None:
            console.print(f"[bold]{name:>9}[/]  {value}")


def status(
    job_id: str = typer.Argument(..., metavar="JOB"),
    as_json: bool = _JSON,
    full: bool = typer.Option(False, "--full", help="With --json: include the job's spec."),
) -> None:
    """A job's state, item counts, throughput, ETA and output location."""
    with open_client() as client:
        job = client.get(job_id, full=full)
    if as_json:
        echo_json(job)
    else:
        _print_status(job)


def watch(
    job_id: str = typer.Argument(..., metavar="JOB"),
    interval: float = typer.Option(0.5, "--interval", help="Seconds between polls."),
    as_json: bool = _JSON,
) -> None:
    """Follow a job with a progress bar (images/s, ETA) until it settles.

    It settles when it completes, fails, is cancelled or is paused. Embedded mode: a queued job
    that nobody is running (no broker, no chunk leased) is run here, in this process.
    """
    with open_client() as client:
        job = client.get(job_id)
        try:
            job = follow(client, job, quiet=as_json, interval=interval)
        except KeyboardInterrupt:
            interrupted(job_id)
        if as_json:
            echo_json(job)
        else:
            print_job_result(job, client.mode)
    exit_for(job)


def list_command(
    state: str | None = typer.Option(None, "--state", help="Only jobs in this state."),
    limit: int = typer.Option(50, "--limit", help="At most N jobs, newest first."),
    as_json: bool = _JSON,
) -> None:
    """Your jobs, newest first."""
    with open_client() as client:
        jobs = client.list_jobs(state=state, limit=limit)
    if as_json:
        echo_json(jobs)
        return
    table = Table(box=box.SIMPLE)
    for column in ("job", "kind", "state", "items", "failed", "images/s", "created"):
        table.add_column(
            column, justify="right" if column in ("items", "failed") else "left", no_wrap=True
        )
    for job in jobs:
        table.add_row(
            job["id"],
            job["kind"],
            job["state"],
            f"{job['done_items'] + job['failed_items']}/{job['total_items']}",
            str(job["failed_items"]),
            "" if job.get("images_per_second") is None else f"{job['images_per_second']:g}",
            str(job.get("created_at", ""))[:19].replace("T", " "),
        )
    wide_console().print(table)


_NO_FOLLOW = typer.Option(
    False, "--detach", help="Return at once instead of following the job (or running it here)."
)


def _control(verb: str, job_id: str, *, run: bool, detach: bool, as_json: bool) -> None:
    with open_client() as client:
        job = getattr(client, verb)(job_id)
        # followed like an attached submit: run here (embedded) or polled until it settles (API)
        followed = run and not detach
        if followed:
            try:
                job = follow(client, job, quiet=as_json)
            except KeyboardInterrupt:
                interrupted(job_id)
        if as_json:
            echo_json(job)
        else:
            print_job_result(job, client.mode)
    if followed:
        exit_for(job)


def cancel(job_id: str = typer.Argument(..., metavar="JOB"), as_json: bool = _JSON) -> None:
    """Cancel a job: finished shards are kept in a valid manifest (_CANCELLED)."""
    _control("cancel", job_id, run=False, detach=True, as_json=as_json)


def pause(job_id: str = typer.Argument(..., metavar="JOB"), as_json: bool = _JSON) -> None:
    """Pause a job: no new chunks start; running ones stop at their next micro-batch."""
    _control("pause", job_id, run=False, detach=True, as_json=as_json)


def resume(
    job_id: str = typer.Argument(..., metavar="JOB"),
    detach: bool = _NO_FOLLOW,
    as_json: bool = _JSON,
) -> None:
    """Resume a paused job and follow it until it settles (embedded mode: run it here), unless
    --detach; the exit code is the outcome's (docs/jobs.md, "Exit codes")."""
    _control("resume", job_id, run=True, detach=detach, as_json=as_json)


def retry(
    job_id: str = typer.Argument(..., metavar="JOB"),
    detach: bool = _NO_FOLLOW,
    as_json: bool = _JSON,
) -> None:
    """Run again the chunks that hold failed items, and follow the job until it settles
    (embedded mode: run them here), unless --detach.

    Items that succeeded before come out byte-identical.
    """
    _control("retry", job_id, run=True, detach=detach, as_json=as_json)


# ------------------------------------------------------------------------------------------------
# download


def _target(root: Path, key: str) -> Path:
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        fail(f"download: refusing the output key {key!r}")
    return root.joinpath(*parts)


def download(
    job_id: str = typer.Argument(..., metavar="JOB"),
    out: Path = typer.Argument(..., metavar="DIR", help="Folder to copy the outputs into."),
    as_json: bool = _JSON,
) -> None:
    """Copy every output object of a job into DIR, with the same relative layout.

    Embedded mode copies from the local output folder; API mode downloads the presigned URLs.
    """
    with open_client() as client:
        outputs = client.outputs(job_id)
        targets = [(o, _target(out, o["key"])) for o in outputs]
        total = 0
        columns = (TextColumn("downloading"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=err_console(), disable=as_json) as progress:
            task = progress.add_task("download", total=len(targets))
            for output, target in targets:
                total += client.fetch(output, target)
                progress.advance(task)
    result = {"job": job_id, "dir": str(out), "files": len(targets), "bytes": total}
    if as_json:
        echo_json(result)
    else:
        typer.echo(f"copied {len(targets)} files ({total / 1e6:.1f} MB) of job {job_id} to {out}")


# ------------------------------------------------------------------------------------------------
# models


@models_app.command("list")
def models_list(as_json: bool = _JSON) -> None:
    """Models that jobs can name ('default' is the bundled model, or $DPIG_MODEL)."""
    with open_client() as client:
        models = client.models()
    if as_json:
        echo_json(models)
        return
    table = Table(box=box.SIMPLE)
    for column in ("name", "version", "resolution", "path"):
        table.add_column(column, no_wrap=True)
    for m in models:
        table.add_row(
            str(m.get("name")), str(m.get("version")), str(m.get("resolution")), str(m.get("path"))
        )
    wide_console().print(table)


@models_app.command("register")
def models_register(
    name: str = typer.Argument(..., help="Name jobs use (--model NAME)."),
    folder: Path = typer.Argument(..., metavar="DIR", help="Weights folder (verified)."),
    as_json: bool = _JSON,
) -> None:
    """Register a weights folder under NAME (embedded mode: where the workers read weights)."""
    with open_client() as client:
        info = client.register_model(name, folder)
    if as_json:
        echo_json(info)
    else:
        typer.echo(
            f"registered {info['name']} (version {info['version'] or '-'}, "
            f"{info['resolution']}) at {info['path']}"
        )


@models_app.command("info")
def models_info(name: str = typer.Argument(...), as_json: bool = _JSON) -> None:
    """A model's version, resolution, weights hash and configuration."""
    with open_client() as client:
        info = client.model_info(name)
    if as_json:
        echo_json(info)
        return
    console = Console(highlight=False, soft_wrap=True)
    for key in ("name", "version", "resolution", "weights_sha256", "path"):
        console.print(f"[bold]{key:>14}[/]  {info.get(key)}")
    config = info.get("config")
    if isinstance(config, dict):
        console.print(
            "[bold]        config[/]  "
            + ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if v is not None)
        )
