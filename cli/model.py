"""`dpig model ...`: inspect model configurations and weights folders."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.errors import fail
from dpig_core.config import PRESETS, DPIGConfig, get_preset

app = typer.Typer(help="Inspect model presets and weights folders.", no_args_is_help=True)


def _fmt(n: int, unit: str) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n} {unit}"


@app.command("info")
def info(
    preset: str = typer.Option(None, "--preset", "-p", help=f"One of: {', '.join(PRESETS)}."),
    weights: Path = typer.Option(
        None, "--weights", "-w", help="A weights folder (its config.json is used)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Parameters and forward MACs per image of every network (encoder, decoder, discriminator,
    pose encoder/decoder, each mapping Φ and critic) and the totals."""
    from dpig_core.model_info import model_info

    if (preset is None) == (weights is None):
        fail("give exactly one of --preset NAME or --weights DIR")
    try:
        config = get_preset(preset) if preset else DPIGConfig.load(weights / "config.json")
    except (ValueError, OSError) as exc:
        fail(str(exc))
    report = model_info(config)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"{config.name}: {config.height}×{config.width}")
    table.add_column("network")
    table.add_column("parameters", justify="right")
    table.add_column("forward MACs / image", justify="right")
    for name, row in report["networks"].items():
        table.add_row(name, _fmt(row["params"], ""), _fmt(row["macs"], "MAC"))
    for name, row in report["totals"].items():
        table.add_row(f"[bold]{name}", _fmt(row["params"], ""), _fmt(row["macs"], "MAC"))
    Console().print(table)
