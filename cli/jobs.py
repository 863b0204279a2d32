"""`dpig submit | status | watch | list | cancel | pause | resume | retry | download | models`.

With `DPIG_API_URL` set these talk to the HTTP API; otherwise they use the embedded default
(SQLite + a local folder under `DPIG_HOME`) and run jobs in this process: `submit` runs the job
right away unless `--detach`, and `watch` runs a queued job that nobody is running. Every command
takes `--json` and then prints jobs as the API returns them. Bad input exits with code 2 and one
line naming the field and the problem, before anything is written.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cli import exit_codes
from cli.client import SETTLED_STATES, ClientError, JobClient, get_client
from cli.errors import fail
from cli.output_format import FORMAT_HELP, parse_format

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
_FRAME_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


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


# ------------------------------------------------------------------------------------------------
# output helpers


def _err_console() -> Console:
    return Console(stderr=True)


def _wide_console() -> Console:
    """Stdout; tables are not squeezed to 80 columns when piped."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _fail(exc: Exception) -> NoReturn:
    fail(str(exc))


@contextmanager
def _client() -> Iterator[JobClient]:
    """A client whose refusals become `fail()` (exit code 2, one line)."""
    client = get_client()
    try:
        yield client
    except ClientError as exc:
        _fail(exc)
    finally:
        client.close()


def local_path(uri: str | None) -> str | None:
    """A file:// URI as a plain path (what a user can open); other URIs as they are."""
    if uri is None:
        return None
    parts = urlsplit(uri)
    return unquote(parts.path) if parts.scheme == "file" else uri


class _RateColumn(ProgressColumn):
    """Images made per second: failed items advance the bar but make no image."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        return Text(f"{rate:.1f} images/s" if rate else "- images/s", style="progress.data.speed")


class JobBar:
    """A Rich progress bar (on stderr) for one job: images/s and ETA; silent when `quiet`."""

    def __init__(self, job: dict[str, Any], *, quiet: bool = False) -> None:
        self.job, self.quiet = job, quiet
        self.progress: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> JobBar:
        if not self.quiet:
            self.progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=_err_console(),
            )
            self.progress.start()
            self.task = self.progress.add_task(self._label(self.job), total=None, rate=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    @staticmethod
    def _label(job: dict[str, Any]) -> str:
        return f"{job['kind']} {job['id'][:13]} {job['state']}"

    def running(self, items: int) -> Callable[[int, int], None]:
        """Switch to in-process counting of `items` items; returns the executor's progress
        callback (items finished, images made)."""
        if self.progress is None:
            return lambda _finished, _made: None
        self.progress.reset(self.task, total=items, completed=0, rate=None)
        self.progress.update(self.task, description=self._label(self.job | {"state": "running"}))
        progress, task = self.progress, self.task
        started, made = time.monotonic(), 0

        def advance(finished: int, new_images: int) -> None:
            nonlocal made
            made += new_images
            rate = made / max(time.monotonic() - started, 1e-3)
            progress.update(task, advance=finished, rate=rate)

        return advance

    def show(self, job: dict[str, Any]) -> None:
        """Polled progress: done + failed of the total, at the job's own images/s."""
        self.job = job
        if self.progress is not None:
            self.progress.update(
                self.task,
                total=job["total_items"],
                completed=job["done_items"] + job["failed_items"],
                description=self._label(job),
                rate=job.get("images_per_second"),
            )


def _follow(
    client: JobClient, job: dict[str, Any], *, quiet: bool, interval: float = 0.5
) -> dict[str, Any]:
    """Until the job settles (completed, failed, cancelled or paused): run it in this process
    when the client can (embedded, nobody else runs it), else poll it."""
    with JobBar(job, quiet=quiet) as bar:
        while True:
            if job["state"] in SETTLED_STATES:
                bar.show(job)
                return job
            if client.can_run(job):
                job = client.run(job["id"], progress=bar.running(client.pending_items(job["id"])))
                bar.job = job
                continue
            bar.show(job)
            time.sleep(interval)
            job = client.get(job["id"])


def _interrupted(job_id: str) -> NoReturn:
    typer.echo(
        f"interrupted: job {job_id} keeps its finished chunks; `dpig watch {job_id}` goes on",
        err=True,
    )
    raise typer.Exit(exit_codes.INTERRUPTED)


def _exit_for(job: dict[str, Any]) -> None:
    """End a command that followed `job` with the exit code of its outcome (cli.exit_codes)."""
    code = exit_codes.for_job(job)
    if code:
        raise typer.Exit(code)


def _summary(job: dict[str, Any]) -> str:
    rate = job.get("images_per_second")
    parts = [
        f"job {job['id']} ({job['kind']}, {job['total_items']} items) {job['state']}: "
        f"{job['done_items']} done, {job['failed_items']} failed"
    ]
    if rate:
        parts.append(f", {rate:g} images/s")
    if job.get("error"):
        parts.append(f" ({job['error']})")
    return "".join(parts)


def _print_job_result(job: dict[str, Any], mode: str) -> None:
    console = Console(soft_wrap=True, highlight=False)
    console.print(_summary(job))
    where = local_path(job.get("output_uri"))
    if job["state"] in ("queued", "paused"):
        hint = "to run it here and follow it" if mode == "embedded" else "to follow it"
        console.print(f"run `dpig watch {job['id']}` {hint}", highlight=False)
    if where:
        console.print(f"outputs: [cyan]{where}", highlight=False)
    if job["failed_items"]:
        console.print(
            f"failed items: {where}errors.jsonl; `dpig retry {job['id']}` runs them again",
            highlight=False,
        )


# ------------------------------------------------------------------------------------------------
# inputs → spec


def parse_frame(value: str, field: str = "pose-size") -> tuple[int, int]:
    match = _FRAME_RE.match(value)
    if match is None or min(int(match.group(1)), int(match.group(2))) <= 0:
        fail(f"{field}: expected HEIGHTxWIDTH such as 128x64, got {value!r}")
    return int(match.group(1)), int(match.group(2))


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _as_local(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path)) if uri.startswith("file://") else Path(uri)


def _keypoints_json(rcv: Any) -> list[list[float]]:
    import numpy as np

    out: list[list[float]] = np.asarray(rcv, np.float64).tolist()
    return out


def _model_frame(client: JobClient, model: str) -> tuple[int, int] | None:
    resolution = str(client.model_info(model).get("resolution", ""))
    match = _FRAME_RE.match(resolution)
    return (int(match.group(1)), int(match.group(2))) if match else None


def load_poses(
    client: JobClient, path: Path, *, pose_size: tuple[int, int] | None, model: str
) -> list[dict[str, Any]]:
    """A pose file → spec poses, each with its frame: the file's own, else `pose_size`, else the
    model's (poses are then checked against it)."""
    from dpig_core.data.pose_files import PoseFileError, load_pose_file

    try:
        poses = load_pose_file(path, *(pose_size or (None, None)))
        if poses.frame is None:
            frame = _model_frame(client, model)
            if frame is None:
                fail(f"poses: {path.name} does not say its frame; pass --pose-size HxW")
            try:
                poses = load_pose_file(path, *frame)
            except PoseFileError as exc:
                fail(
                    f"poses: {exc} (the file does not say its frame, so the model's "
                    f"{frame[0]}x{frame[1]} is assumed; pass --pose-size HxW)"
                )
    except PoseFileError as exc:
        fail(f"poses: {exc}")
    assert poses.height is not None and poses.width is not None
    return [
        {"id": pid, "keypoints": _keypoints_json(rcv), "height": poses.height, "width": poses.width}
        for pid, rcv in poses
    ]


def read_keypoints_file(path: Path) -> dict[str, list[list[float]]]:
    """`--keypoints FILE`: a pose file (any supported format) whose pose ids name images, with
    keypoints in the images' own pixels."""
    from dpig_core.data.pose_files import PoseFileError, load_pose_file

    try:
        poses = load_pose_file(path)
    except PoseFileError as exc:
        fail(f"keypoints: {exc}")
    return {pid: _keypoints_json(rcv) for pid, rcv in poses}


def _match_keypoints(
    keys: list[str], given: dict[str, list[list[float]]]
) -> tuple[dict[str, list[list[float]]], int]:
    """Give image keys their keypoints by relative path, file name or stem (an OpenPose id
    `stem#0` counts as its stem); returns the matches and how many entries matched nothing."""
    by_name: dict[str, str] = {}
    for key in keys:
        pure = PurePosixPath(key)
        for alias in (pure.stem, pure.name, key):  # later, more specific aliases win
            by_name[alias] = key
    out: dict[str, list[list[float]]] = {}
    unmatched = 0
    for pid, kp in given.items():
        found = by_name.get(pid) or by_name.get(pid.removesuffix("#0"))
        if found is None:
            unmatched += 1
        else:
            out[found] = kp
    return out, unmatched


def _dataset_keypoints(folder: Path) -> dict[Path, list[list[float]]]:
    """Keypoints of the images under `folder` from its annotations (Market-1501, DeepFashion) or,
    for a split folder such as bounding_box_test/, from its parent's annotation CSVs."""
    from dpig_core.data.readers import DatasetError, read_dataset

    def read(root: Path) -> dict[Path, list[list[float]]]:
        try:
            records = read_dataset(root).records
        except DatasetError:
            return {}
        return {
            r.path.resolve(): _keypoints_json(r.rcv)
            for r in records
            if r.rcv is not None and r.path.resolve().is_relative_to(folder)
        }

    found = read(folder)
    if not found and any(folder.parent.glob("*annotation*.csv")):
        found = read(folder.parent)
    return found


def _local_image_keys(folder: Path) -> list[str]:
    """The source keys the job will see for a local folder (as the service lists them)."""
    from service.settings import get_settings
    from service.storage import open_image_source

    return open_image_source(
        folder.as_uri(), get_settings(), allowed_prefixes=[folder.as_uri()], field="images"
    ).keys()


def pose_grid_spec(
    client: JobClient,
    *,
    poses_file: Path,
    images: str,
    keypoints: Path | None = None,
    pose_size: tuple[int, int] | None = None,
    model: str = "default",
    seed: int = 0,
    chunk_size: int | None = None,
    layout: str = "webdataset",
    max_sources: int | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The spec of a pose-grid job from a pose file and a source folder (or S3 prefix); what
    the user should know about the sources' keypoints is appended to `notes`."""
    notes = [] if notes is None else notes
    poses = load_poses(client, poses_file, pose_size=pose_size, model=model)
    given = read_keypoints_file(keypoints) if keypoints is not None else None
    spec: dict[str, Any] = {
        "kind": "pose_grid",
        "poses": poses,
        "model": model,
        "seed": seed,
        "chunk_size": chunk_size,
        "layout": layout,
        "max_sources": max_sources,
    }
    if _is_remote(images):
        spec["images"] = images
        spec["source_keypoints"] = given
        return spec
    folder = _as_local(images).expanduser()
    if client.mode == "embedded" or folder.exists():
        if not folder.exists():
            fail(f"images: {folder}: no such folder")
        if not folder.is_dir():
            fail(f"images: {folder}: not a folder")
        folder = folder.resolve()
        keys = _local_image_keys(folder)  # none: the service says so
        if isinstance(max_sources, int) and max_sources > 0:
            keys = keys[:max_sources]
        if given is not None:
            found, unmatched = _match_keypoints(keys, given)
            if unmatched and not max_sources:
                notes.append(f"{unmatched} entries of {keypoints} match no image in {folder}")
        else:
            by_path = _dataset_keypoints(folder)
            found = {k: by_path[folder / k] for k in keys if folder / k in by_path}
        missing = len(keys) - len(found)
        if missing:
            notes.append(
                f"{missing} of {len(keys)} source images have no keypoints: they are estimated "
                "(needs the `pose` extra) or fail as items"
            )
        spec["source_keypoints"] = found or None
    else:
        spec["source_keypoints"] = given
    spec["images"] = str(folder)
    return spec


class ImageRefs:
    """Reference images (`--fg/--bg/--pose`, swap and interpolate rows) → spec ImageRefs with
    keypoints from `--keypoints`, else from the annotations of the image's dataset."""

    def __init__(self, client: JobClient, keypoints: Path | None) -> None:
        self.client = client
        self.given = read_keypoints_file(keypoints) if keypoints is not None else None
        self._folders: dict[Path, dict[Path, list[list[float]]]] = {}

    def _lookup_given(self, uri: str) -> list[list[float]] | None:
        if self.given is None:
            return None
        pure = PurePosixPath(urlsplit(uri).path if "://" in uri else uri)
        for alias in (uri, pure.as_posix(), pure.name, pure.stem, pure.stem + "#0"):
            if alias in self.given:
                return self.given[alias]
        return None

    def _annotated(self, path: Path) -> list[list[float]] | None:
        for folder in (path.parent, path.parent.parent):
            if not any(folder.glob("*annotation*.csv")):
                continue
            if folder not in self._folders:
                self._folders[folder] = _dataset_keypoints(folder)
            if path in self._folders[folder]:
                return self._folders[folder][path]
        return None

    def ref(self, value: Any, field: str) -> dict[str, Any]:
        """A path or URI (or a {uri, keypoints} object) → {"uri", "keypoints"}."""
        if isinstance(value, dict):
            uri, keypoints = value.get("uri"), value.get("keypoints")
        else:
            uri, keypoints = value, None
        if not isinstance(uri, str) or not uri.strip():
            fail(f"{field}: expected an image path or URI, got {uri!r}")
        if keypoints is None:
            keypoints = self._lookup_given(uri)
        if _is_remote(uri):
            return {"uri": uri, "keypoints": keypoints}
        path = _as_local(uri).expanduser()
        if self.client.mode == "embedded" or path.exists():
            if not path.is_file():
                fail(f"{field}: {uri}: no such image file")
            path = path.resolve()
            if keypoints is None:
                keypoints = self._annotated(path)
        return {"uri": str(path), "keypoints": keypoints}


def _common(
    model: str,
    seed: int,
    chunk_size: int | None,
    layout: str,
    image_format: str,
    expires_after: int | None = None,
    retain_days: int | None = None,
    callback_url: str | None = None,
) -> dict[str, Any]:
    return {
        "callback_url": callback_url,
        "model": model,
        "seed": seed,
        "chunk_size": chunk_size,
        "layout": layout,
        "output": _output(image_format),
        "expires_after": expires_after,
        "retain_days": retain_days,
    }


def _output(image_format: str) -> dict[str, Any]:
    try:
        return parse_format(image_format)
    except ValueError as exc:
        fail(str(exc))


def _submit(
    spec: dict[str, Any], *, detach: bool, as_json: bool, notes: list[str] | None = None
) -> None:
    with _client() as client:
        job = client.submit(spec, wait=False)
        if not as_json:
            for note in notes or ():
                typer.echo(f"note: {note}", err=True)
        if not detach:
            try:
                job = _follow(client, job, quiet=as_json)
            except KeyboardInterrupt:
                _interrupted(job["id"])
        if as_json:
            _echo_json(job)
        else:
            _print_job_result(job, client.mode)
    if not detach:
        _exit_for(job)


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
    with _client() as client:
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
        spec["output"] = _output(image_format)
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
        **_common(
            model, seed, chunk_size, layout, image_format, expires_after, retain_days, callback_url
        ),
    }
    for name, value in (("count", count), ("identities", identities)):
        if value is not None:
            spec[name] = value
    if per_identity is not None:
        spec["per_identity"] = per_identity
    with _client() as client:
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
    with _client() as client:
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
        **_common(
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
    with _client() as client:
        refs = ImageRefs(client, keypoints)
        pair = {"a": refs.ref(a, "a"), "b": refs.ref(b, "b"), "custom_id": custom_id}
    spec = {
        "kind": "interpolate",
        "pairs": [pair],
        "steps": steps,
        "method": method,
        "factors": [f.strip() for f in factors.split(",") if f.strip()],
        **_common(
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
    with _client() as client:
        job = client.get(job_id, full=full)
    if as_json:
        _echo_json(job)
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
    with _client() as client:
        job = client.get(job_id)
        try:
            job = _follow(client, job, quiet=as_json, interval=interval)
        except KeyboardInterrupt:
            _interrupted(job_id)
        if as_json:
            _echo_json(job)
        else:
            _print_job_result(job, client.mode)
    _exit_for(job)


def list_command(
    state: str | None = typer.Option(None, "--state", help="Only jobs in this state."),
    limit: int = typer.Option(50, "--limit", help="At most N jobs, newest first."),
    as_json: bool = _JSON,
) -> None:
    """Your jobs, newest first."""
    with _client() as client:
        jobs = client.list_jobs(state=state, limit=limit)
    if as_json:
        _echo_json(jobs)
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
    _wide_console().print(table)


_NO_FOLLOW = typer.Option(
    False, "--detach", help="Return at once instead of following the job (or running it here)."
)


def _control(verb: str, job_id: str, *, run: bool, detach: bool, as_json: bool) -> None:
    with _client() as client:
        job = getattr(client, verb)(job_id)
        # followed like an attached submit: run here (embedded) or polled until it settles (API)
        followed = run and not detach
        if followed:
            try:
                job = _follow(client, job, quiet=as_json)
            except KeyboardInterrupt:
                _interrupted(job_id)
        if as_json:
            _echo_json(job)
        else:
            _print_job_result(job, client.mode)
    if followed:
        _exit_for(job)


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
    with _client() as client:
        outputs = client.outputs(job_id)
        targets = [(o, _target(out, o["key"])) for o in outputs]
        total = 0
        columns = (TextColumn("downloading"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=_err_console(), disable=as_json) as progress:
            task = progress.add_task("download", total=len(targets))
            for output, target in targets:
                total += client.fetch(output, target)
                progress.advance(task)
    result = {"job": job_id, "dir": str(out), "files": len(targets), "bytes": total}
    if as_json:
        _echo_json(result)
    else:
        typer.echo(f"copied {len(targets)} files ({total / 1e6:.1f} MB) of job {job_id} to {out}")


# ------------------------------------------------------------------------------------------------
# models


@models_app.command("list")
def models_list(as_json: bool = _JSON) -> None:
    """Models that jobs can name ('default' is the bundled model, or $DPIG_MODEL)."""
    with _client() as client:
        models = client.models()
    if as_json:
        _echo_json(models)
        return
    table = Table(box=box.SIMPLE)
    for column in ("name", "version", "resolution", "path"):
        table.add_column(column, no_wrap=True)
    for m in models:
        table.add_row(
            str(m.get("name")), str(m.get("version")), str(m.get("resolution")), str(m.get("path"))
        )
    _wide_console().print(table)


@models_app.command("register")
def models_register(
    name: str = typer.Argument(..., help="Name jobs use (--model NAME)."),
    folder: Path = typer.Argument(..., metavar="DIR", help="Weights folder (verified)."),
    as_json: bool = _JSON,
) -> None:
    """Register a weights folder under NAME (embedded mode: where the workers read weights)."""
    with _client() as client:
        info = client.register_model(name, folder)
    if as_json:
        _echo_json(info)
    else:
        typer.echo(
            f"registered {info['name']} (version {info['version'] or '-'}, "
            f"{info['resolution']}) at {info['path']}"
        )


@models_app.command("info")
def models_info(name: str = typer.Argument(...), as_json: bool = _JSON) -> None:
    """A model's version, resolution, weights hash and configuration."""
    with _client() as client:
        info = client.model_info(name)
    if as_json:
        _echo_json(info)
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
