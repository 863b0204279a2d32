"""`dpig data ...`: synthetic people, dataset validation and pose export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.data_synth import synth_command
from cli.errors import fail

if TYPE_CHECKING:
    from dpig_core.data.records import DatasetIndex

app = typer.Typer(help="Make, check and inspect datasets.", no_args_is_help=True)

FORMATS = ("auto", "market", "deepfashion", "folder")


def _read(root: Path, fmt: str, keypoints: Path | None) -> DatasetIndex:
    from dpig_core.data.readers import DatasetError, read_dataset

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        return read_dataset(root, fmt, keypoints=keypoints)
    except DatasetError as exc:
        fail(str(exc))


def _print_report(report: dict[str, Any]) -> None:
    console = Console()
    console.print(f"[bold]{report['format']}[/] dataset at {report['root']}")
    table = Table()
    for column in ("split", "images", "identities", "with keypoints"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, row in report["splits"].items():
        table.add_row(split, str(row["images"]), str(row["identities"]), str(row["with_keypoints"]))
    table.add_row(
        "[bold]all",
        str(report["images"]),
        str(report["identities"]),
        str(report["with_keypoints"]),
    )
    console.print(table)
    sizes = report["image_sizes"] or {}
    console.print(
        "image sizes: " + (", ".join(f"{hw} ({n})" for hw, n in sizes.items()) or "none readable")
    )
    if not report["problems"]:
        console.print("problems: none")
        return
    console.print("problems:")
    for kind, count in report["problems"].items():
        example = report["problem_examples"][kind][0]["message"]
        console.print(
            f"  {kind}: {count}  (e.g. {example})", markup=False, highlight=False, soft_wrap=True
        )


@app.command("index")
def index(
    root: Path = typer.Argument(..., help="Dataset root folder."),
    fmt: str = typer.Option(
        "auto", "--format", "-f", help="auto, market, deepfashion or folder (a photo folder)."
    ),
    keypoints: Path | None = typer.Option(
        None, "--keypoints", help="Photo folders: a keypoints CSV or a folder of OpenPose JSON."
    ),
    workers: int = typer.Option(
        min(8, os.cpu_count() or 1), "--workers", min=1, help="Threads decoding images."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON report."),
) -> None:
    """Validate a dataset: decode every image, check keypoints, and report counts and problems.

    Bad items are reported, not fatal: the exit code is 0 unless ROOT is missing or of no known
    format.
    """
    from dpig_core.data.readers import check_images, index_report

    dataset = _read(root, fmt, keypoints)
    if as_json:
        check = check_images(dataset, max_workers=workers)
    else:
        columns = (
            TextColumn("checking images"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("check", total=len(dataset.records))
            check = check_images(
                dataset, max_workers=workers, on_progress=lambda n: progress.advance(task, n)
            )
    report = index_report(dataset, check)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


@app.command("poses")
def poses(
    source: Path = typer.Option(..., "--from", help="Dataset root with keypoint annotations."),
    out: Path = typer.Option(..., "--out", "-o", help="Pose file to write (dpig-poses/1 JSON)."),
    split: str | None = typer.Option(None, "--split", help="Only this split (default: all)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N poses, at random."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random choice under --limit."),
    fmt: str = typer.Option("auto", "--format", "-f", help="auto, market, deepfashion or folder."),
    keypoints: Path | None = typer.Option(
        None, "--keypoints", help="Photo folders: a keypoints CSV or a folder of OpenPose JSON."
    ),
    height: int | None = typer.Option(None, "--height", min=1, help="Rescale poses to this frame."),
    width: int | None = typer.Option(None, "--width", min=1, help="Rescale poses to this frame."),
) -> None:
    """Export a dataset's real poses to a pose file for pose-grid jobs (sorted, deterministic)."""
    from dpig_core.data.pose_files import PoseFileError, export_poses, write_pose_file

    if (height is None) != (width is None):
        fail("give both --height and --width, or neither")
    dataset = _read(source, fmt, keypoints)
    records = dataset.records
    if split is not None:
        splits = sorted({r.split for r in records})
        if split not in splits:
            fail(f"no split {split!r} in {source}; it has: {', '.join(splits) or 'none'}")
        records = dataset.split(split)
    try:
        pose_set = export_poses(
            records, root=dataset.root, limit=limit, seed=seed, height=height, width=width
        )
        assert pose_set.height is not None and pose_set.width is not None
        write_pose_file(out, pose_set, pose_set.height, pose_set.width)
    except PoseFileError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    where = f"split {split!r}" if split is not None else "all splits"
    typer.echo(
        f"wrote {len(pose_set)} poses ({pose_set.height}x{pose_set.width}) from the "
        f"{dataset.format} dataset {source} ({where}) to {out}"
    )


app.command("synth", help="Write a Market-1501-format dataset of synthetic people.")(synth_command)
