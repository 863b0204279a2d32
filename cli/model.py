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


@app.command("evaluate")
def evaluate(
    weights: Path = typer.Option(..., "--weights", "-w", help="Weights folder to evaluate."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset with held-out identities."),
    split: str = typer.Option("test", help="Split of held-out identities."),
    fid_count: int = typer.Option(1000, min=0, help="Images per FID set (0 skips FID)."),
    seed: int = typer.Option(0, help="Seed of the sampled people."),
    heldout_images: int = typer.Option(
        512, min=2, help="Images scored with true person masks (synthetic data only)."
    ),
    out: Path = typer.Option(None, help="Write the report to this JSON file."),
) -> None:
    """Model-card figures: reconstruction SSIM (3 variants), PSNR and L1 on held-out identities,
    and FID of Φ samples beside real-vs-real and real-vs-noise FID. On synthetic data also
    person and background L1 and the bg-swap leakage with the renderer's true person masks,
    each beside its perfect-render ceiling or ground-truth floor."""
    from dpig_core.data.readers import read_dataset
    from dpig_core.metrics.model_card import environment, reconstruction_quality, sampling_fid
    from dpig_core.weights import WeightsError, from_pretrained, read_manifest

    try:
        model = from_pretrained(weights)
        index = read_dataset(data)
    except (WeightsError, ValueError, OSError) as exc:
        fail(str(exc))
    records = index.split(split)
    if not records:
        fail(f"{data}: no images in split {split!r}")
    report: dict[str, object] = {
        "model": read_manifest(weights)["name"],
        "data": str(data),
        "split": split,
        "reconstruction": reconstruction_quality(model, records),
    }
    if (data / "factors.jsonl").is_file():
        from dpig_core.metrics.heldout import heldout_figures, load_synthetic

        report["true_masks"] = heldout_figures(model, load_synthetic(data, split), heldout_images)
    if fid_count:
        if len(records) < 2 * fid_count:
            fail(f"FID needs {2 * fid_count} held-out images, the split has {len(records)}")
        from dpig_core.metrics.fid import FIDWeightsError, InceptionFeatures

        try:
            extractor = InceptionFeatures()
        except FIDWeightsError as exc:
            fail(f"{exc} (or pass --fid-count 0)")
        real_a, real_b = records[::2], records[1::2]
        report["sampling"] = sampling_fid(model, real_a, real_b, count=fid_count, seed=seed,
                                          extractor=extractor)  # fmt: skip
    report["environment"] = environment()
    text = json.dumps(report, indent=2, default=str)
    if out:
        out.write_text(text + "\n")
    typer.echo(text)


@app.command("curve")
def curve(
    run: Path = typer.Option(..., "--run", "-r", help="A training run folder (its metrics.jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
) -> None:
    """Draw a run's learning curve (held-out figures logged with `stage1.eval_every`) as a PNG,
    each figure beside its perfect-render ceiling or ground-truth floor; print the last point."""
    from dpig_core.imaging import save_png
    from dpig_core.train.curve import heldout_points, learning_curve

    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        fail(f"{run}: no metrics.jsonl")
    points = heldout_points(metrics)
    try:
        save_png(out, learning_curve(points))
    except ValueError as exc:
        fail(f"{run}: {exc}")
    typer.echo(json.dumps(points[-1]))
    typer.echo(f"wrote {out} ({len(points)} points)")


@app.command("export")
def export(
    weights: Path = typer.Option(..., "--weights", "-w", help="Weights folder to export."),
    out: Path = typer.Option(..., "--out", "-o", help="New weights folder."),
    name: str = typer.Option(..., help="Name recorded in the manifest."),
    version: str = typer.Option("0.1.0", help="Version recorded in the manifest."),
    inference_only: bool = typer.Option(
        True, help="Drop the discriminator and critics (generation never needs them)."
    ),
    include: list[Path] = typer.Option(
        [], help="Files copied into the folder and hashed in its manifest (model card, metrics)."
    ),
) -> None:
    """Write a named, versioned, hashed copy of a weights folder (how models/ is made)."""
    import shutil

    from dpig_core.weights import (
        ALL_COMPONENTS,
        INFERENCE_COMPONENTS,
        WeightsError,
        from_pretrained,
        save_pretrained,
    )

    try:
        model = from_pretrained(weights)
    except WeightsError as exc:
        fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    for path in include:
        if not path.is_file():
            fail(f"--include {path}: no such file")
        if path.resolve() != (out / path.name).resolve():
            shutil.copyfile(path, out / path.name)
    components = INFERENCE_COMPONENTS if inference_only else ALL_COMPONENTS
    save_pretrained(model, out, name=name, version=version, components=components,
                    extra_files=tuple(p.name for p in include))  # fmt: skip
    typer.echo(f"wrote {name} {version} to {out}")
