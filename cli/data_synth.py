"""`dpig data synth`: write a Market-1501-format dataset of synthetic people."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.console import Console

from cli.errors import fail

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(value: str) -> tuple[int, int]:
    """'128x64' → (128, 64): height × width, as Market-1501 crops are written."""
    match = _SIZE.match(value)
    if match is None:
        raise typer.BadParameter(
            f"expected HEIGHTxWIDTH such as 128x64 or 64x32, got {value!r}", param_hint="--size"
        )
    height, width = int(match.group(1)), int(match.group(2))
    if height < 16 or width < 8:
        raise typer.BadParameter(
            f"{height}x{width} is too small; the minimum is 16x8", param_hint="--size"
        )
    return height, width


def synth_command(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Dataset folder to write (created if missing).", file_okay=False
    ),
    identities: int = typer.Option(100, min=1, help="Number of synthetic people."),
    per_identity: int = typer.Option(8, min=2, help="Images per person."),
    size: str = typer.Option("128x64", help="Image size HEIGHTxWIDTH, e.g. 128x64 or 64x32."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes byte-identical files."),
    test_fraction: float = typer.Option(
        0.5, min=0.0, max=1.0, help="Fraction of identities held out for bounding_box_test/query."
    ),
) -> None:
    """Draw synthetic people with ground truth for identity, pose, background and camera."""
    from dpig_core.data.synth import write_market_dataset

    height, width = parse_size(size)
    try:
        summary = write_market_dataset(
            out,
            identities=identities,
            per_identity=per_identity,
            height=height,
            width=width,
            seed=seed,
            test_fraction=test_fraction,
        )
    except (FileExistsError, ValueError) as exc:
        fail(str(exc))
    Console().print(
        f"Wrote [bold]{summary.images}[/bold] synthetic people at {height}x{width} to "
        f"[cyan]{summary.root}[/cyan]: {summary.train_images} train images of "
        f"{summary.train_identities} identities, {summary.test_images} gallery and "
        f"{summary.query_images} query images of {summary.test_identities} test identities; "
        f"{summary.train_pairs} train and {summary.test_pairs} test pairs; ground truth in "
        f"factors.jsonl. Took {summary.seconds:.1f} s ({summary.images_per_second:.0f} images/s)."
    )
