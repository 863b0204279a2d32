"""What the job commands show: consoles, JSON, the progress bar of a followed job, the line
that ends a command, and its exit code (cli.exit_codes); and the client every command opens."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import typer
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
from rich.text import Text

from cli import exit_codes
from cli.client import SETTLED_STATES, ClientError, JobClient, get_client
from cli.errors import fail


def err_console() -> Console:
    return Console(stderr=True)


def wide_console() -> Console:
    """Stdout; tables are not squeezed to 80 columns when piped."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def fail_on(exc: Exception) -> NoReturn:
    fail(str(exc))


@contextmanager
def open_client() -> Iterator[JobClient]:
    """A client whose refusals become `fail()` (exit code 2, one line)."""
    client = get_client()
    try:
        yield client
    except ClientError as exc:
        fail_on(exc)
    finally:
        client.close()


def local_path(uri: str | None) -> str | None:
    """A file:// URI as a plain path (what a user can open); other URIs as they are."""
    if uri is None:
        return None
    parts = urlsplit(uri)
    return unquote(parts.path) if parts.scheme == "file" else uri


class RateColumn(ProgressColumn):
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
                RateColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err_console(),
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


def follow(
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


def interrupted(job_id: str) -> NoReturn:
    typer.echo(
        f"interrupted: job {job_id} keeps its finished chunks; `dpig watch {job_id}` goes on",
        err=True,
    )
    raise typer.Exit(exit_codes.INTERRUPTED)


def exit_for(job: dict[str, Any]) -> None:
    """End a command that followed `job` with the exit code of its outcome (cli.exit_codes)."""
    code = exit_codes.for_job(job)
    if code:
        raise typer.Exit(code)


def summary_line(job: dict[str, Any]) -> str:
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


def print_job_result(job: dict[str, Any], mode: str) -> None:
    console = Console(soft_wrap=True, highlight=False)
    console.print(summary_line(job))
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
