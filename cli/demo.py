"""`dpig demo`: the bundled model at work, offline, with no servers.

Until the job service lands it runs the two main jobs in-process: a pose grid (synthetic source
people × target poses, each source encoded once) and a Virtual-Market sample (identities × images,
every factor drawn through Φ). It writes the images and a contact sheet for each.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from cli.errors import fail

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "dpig-market-small-synth"


def default_home() -> Path:
    return Path(os.environ.get("DPIG_HOME", Path.home() / ".dpig"))


def default_model() -> Path:
    return Path(os.environ.get("DPIG_MODEL", BUNDLED_MODEL))


def demo(
    model_dir: Path = typer.Option(
        None, "--model", help="Weights folder (default: the bundled model)."
    ),
    out: Path = typer.Option(None, help="Output folder (default: $DPIG_HOME/demo)."),
    sources: int = typer.Option(4, min=1, max=64, help="Source people of the pose grid."),
    poses: int = typer.Option(6, min=1, max=64, help="Target poses of the pose grid."),
    identities: int = typer.Option(4, min=1, max=64, help="Sampled identities."),
    per_identity: int = typer.Option(6, min=1, max=64, help="Images per sampled identity."),
    seed: int = typer.Option(0, help="Seed of the source people, poses and noise."),
) -> None:
    """Run a pose-grid job and a sampling job with the bundled model and write contact sheets."""
    from dpig_core.demo import run_demo
    from dpig_core.weights import WeightsError

    console = Console()
    model_dir = model_dir or default_model()
    out = out or default_home() / "demo"
    try:
        result = run_demo(model_dir, out, sources=sources, poses=poses, identities=identities,
                          per_identity=per_identity, seed=seed)  # fmt: skip
    except WeightsError as exc:
        fail(str(exc))
    console.print(f"model: {result['model']} ({model_dir})")
    console.print(
        f"pose grid: {result['pose_grid_items']} images in [cyan]{result['pose_grid_dir']}"
    )
    console.print(f"  contact sheet: [cyan]{result['pose_grid_sheet']}")
    console.print(f"samples: {result['sample_items']} images in [cyan]{result['sample_dir']}")
    console.print(f"  contact sheet: [cyan]{result['sample_sheet']}")
