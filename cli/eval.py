"""`dpig eval transfer|sample|swap`: measure a model and write a JSON report and a contact sheet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cli.demo import default_home, default_model
from cli.errors import fail

app = typer.Typer(
    help="Measure a model: pose transfer, sampling, factor swaps (see docs/quality.md).",
    no_args_is_help=True,
)

MODEL = typer.Option(None, "--model", "-m", help="Weights folder [default: the bundled model].")
DATA = typer.Option(..., "--data", "-d", help="Dataset folder (Market-1501, DeepFashion, ...).")
SPLIT = typer.Option("test", help="Split to evaluate on (all images if the dataset has none).")
OUT = typer.Option(None, "--out", "-o", help="Folder for report.json and contact_sheet.png.")
JSON = typer.Option(False, "--json", help="Print the report as JSON.")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
BATCH = typer.Option(32, min=1, help="Micro-batch size.")
FID = typer.Option(True, "--fid/--no-fid", help="Compute FID (needs the metrics extra).")
IS_WEIGHTS = typer.Option(
    None, help="pt_inception-2015-12-05-6726825d.pth, to report the Inception Score."
)
PROBE = typer.Option(None, help="Pose-probe folder [default: the bundled synthetic probe].")


def _setup(
    model: Path | None, data: Path, split: str, device: str, batch_size: int
) -> tuple[Any, Any, dict[str, Any]]:
    from dpig_core.metrics.evaluate import load_eval_data
    from dpig_core.pipeline import DPIGPipeline
    from dpig_core.train.run import pick_device
    from dpig_core.weights import WeightsError, read_manifest

    folder = model or default_model()
    try:
        pipe = DPIGPipeline.from_pretrained(
            folder, device=pick_device(device), batch_size=batch_size
        )
        manifest = read_manifest(folder)
        eval_data = load_eval_data(data, split)
    except (WeightsError, ValueError, OSError, RuntimeError) as exc:
        fail(str(exc))
    about = {k: manifest.get(k) for k in ("name", "version")} | {"folder": str(folder)}
    return pipe, eval_data, about


def _extras(
    *, fid: bool, is_weights: Path | None, probe: Path | None, lpips: tuple[Path | None, ...] = ()
) -> Any:
    from dpig_core.metrics.evaluate import Extras
    from dpig_core.metrics.gated import MetricUnavailable

    extras = Extras(fid_cache=default_home() / "cache" / "fid")
    if fid:
        try:
            from dpig_core.metrics.fid import InceptionFeatures

            extras.fid = InceptionFeatures()
        except (ImportError, RuntimeError, OSError) as exc:
            extras.unavailable["fid"] = f"{exc} (install the metrics extra, or pass --no-fid)"
    else:
        extras.unavailable["fid"] = "--no-fid"
    try:
        if is_weights is not None:
            from dpig_core.metrics.inception_score import load_inception_for_is

            extras.inception = load_inception_for_is(is_weights)
        else:
            from dpig_core.metrics.inception_score import IS_HINT

            extras.unavailable["inception_score"] = IS_HINT
        if lpips and all(p is not None for p in lpips):
            from dpig_core.metrics.lpips import load_lpips

            extras.lpips = load_lpips(lpips[0], lpips[1])
        elif lpips:
            from dpig_core.metrics.lpips import LPIPS_HINT

            extras.unavailable["lpips"] = LPIPS_HINT
    except MetricUnavailable as exc:
        fail(str(exc))
    from dpig_core.metrics.pose_probe import DEFAULT_PROBE, ProbeError, load_probe

    folder = probe or DEFAULT_PROBE
    if probe is None and not folder.is_dir():
        extras.unavailable["pose_accuracy"] = f"no pose probe at {folder}; pass --probe DIR"
    else:
        try:
            extras.probe = load_probe(folder)
        except (ProbeError, OSError) as exc:
            fail(str(exc))
    return extras


def _write(
    report: dict[str, Any], sheet: Any, about: dict[str, Any], out: Path | None, as_json: bool
) -> None:
    from dpig_core.imaging import save_png
    from dpig_core.metrics.model_card import environment

    report["model"] = about
    report["environment"] = environment()
    folder = out or Path("eval") / f"{about['name']}-{report['kind']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    save_png(folder / "contact_sheet.png", sheet)
    report["files"] = {
        "report": str(folder / "report.json"),
        "contact_sheet": str(folder / "contact_sheet.png"),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    table = Table(title=f"dpig eval {report['kind']}: {about['name']}", show_header=False)
    for section, values in report.items():
        if isinstance(values, dict) and values and section not in ("metric_variants", "files"):
            flat = ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, dict))
            nested = {k: v for k, v in values.items() if isinstance(v, dict)}
            if flat:
                table.add_row(section, flat)
            for k, v in nested.items():
                table.add_row(f"{section}.{k}", ", ".join(f"{a}={b}" for a, b in v.items()))
        elif not isinstance(values, dict) and values is not None:
            table.add_row(section, str(values))
    console = Console()
    console.print(table)
    console.print(
        f"report: {folder / 'report.json'}\ncontact sheet: {folder / 'contact_sheet.png'}"
    )


@app.command("transfer")
def transfer(
    model: Path = MODEL,
    data: Path = DATA,
    split: str = SPLIT,
    out: Path = OUT,
    as_json: bool = JSON,
    pairs: int = typer.Option(1000, min=1, help="At most this many (source, target) pairs."),
    mask: str = typer.Option(
        "target", help="Mask-SSIM keypoints: target (PATN/GFLA) or source (DPIG's script)."
    ),
    device: str = DEVICE,
    batch_size: int = BATCH,
    fid: bool = FID,
    is_weights: Path = IS_WEIGHTS,
    lpips_alexnet: Path = typer.Option(None, help="alexnet-owt-7be5be79.pth, for LPIPS."),
    lpips_heads: Path = typer.Option(None, help="lpips v0.1 alex.pth, for LPIPS."),
    probe: Path = PROBE,
) -> None:
    """Pose transfer between images of one identity, scored against the target image and, on
    synthetic data, against the true rendering."""
    from dpig_core.metrics.evaluate import evaluate_transfer

    if mask not in ("target", "source"):
        fail(f"--mask must be target or source, not {mask!r}")
    pipe, eval_data, about = _setup(model, data, split, device, batch_size)
    extras = _extras(
        fid=fid, is_weights=is_weights, probe=probe, lpips=(lpips_alexnet, lpips_heads)
    )
    try:
        report, sheet = evaluate_transfer(pipe, eval_data, extras, max_pairs=pairs, mask_from=mask)
    except ValueError as exc:
        fail(str(exc))
    _write(report, sheet, about, out, as_json)


@app.command("sample")
def sample(
    model: Path = MODEL,
    data: Path = DATA,
    split: str = SPLIT,
    out: Path = OUT,
    as_json: bool = JSON,
    count: int = typer.Option(1000, min=2, help="People to sample."),
    seed: int = typer.Option(0, help="Job seed."),
    device: str = DEVICE,
    batch_size: int = BATCH,
    fid: bool = FID,
    is_weights: Path = IS_WEIGHTS,
    probe: Path = PROBE,
) -> None:
    """New people with every factor drawn through Φ: FID against the real split, pose accuracy,
    Inception Score when its weights are given. The sheet is a Virtual Market (one identity per
    row)."""
    from dpig_core.metrics.evaluate import evaluate_sample

    pipe, eval_data, about = _setup(model, data, split, device, batch_size)
    extras = _extras(fid=fid, is_weights=is_weights, probe=probe)
    report, sheet = evaluate_sample(pipe, eval_data, extras, count=count, seed=seed)
    _write(report, sheet, about, out, as_json)


@app.command("swap")
def swap(
    model: Path = MODEL,
    data: Path = DATA,
    split: str = SPLIT,
    out: Path = OUT,
    as_json: bool = JSON,
    people: int = typer.Option(64, min=2, help="People (one image per identity)."),
    seed: int = typer.Option(0, help="Seed of the re-sampled factors."),
    device: str = DEVICE,
    batch_size: int = BATCH,
) -> None:
    """Foreground/background disentanglement: how much each region changes when only the other
    factor is re-sampled or swapped, and (synthetic data) swaps against the true rendering."""
    from dpig_core.metrics.evaluate import evaluate_swap

    pipe, eval_data, about = _setup(model, data, split, device, batch_size)
    from dpig_core.metrics.evaluate import Extras

    extras = Extras()  # the swap scores need no extra networks
    try:
        report, sheet = evaluate_swap(pipe, eval_data, extras, people_count=people, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    _write(report, sheet, about, out, as_json)
