"""`dpig train STAGE`: stage 1, the pose auto-encoder, the mappings Φ, or all three."""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from cli.errors import fail

console = Console(stderr=True)


class StageChoice(StrEnum):
    stage1 = "stage1"
    pose_ae = "pose-ae"
    mappings = "mappings"
    all = "all"


def _parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        stage, dot, field = key.partition(".")
        if not sep or not dot or stage not in ("stage1", "pose-ae", "mappings"):
            fail(
                f"--set expects STAGE.FIELD=VALUE (STAGE: stage1, pose-ae, mappings), got {item!r}"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(stage, {})[field] = value
    return out


def train(
    stage: StageChoice = typer.Argument(
        ..., help="Which stage to train ('all' runs the three in order)."
    ),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Dataset root (Market-1501, DeepFashion or a photo folder)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: checkpoints, metrics.jsonl, samples/, weights/."
    ),
    preset: str = typer.Option("market-small", help="Model preset for a new run."),
    init: Path = typer.Option(
        None, help="Start from this weights folder (default: the run's own weights, if any)."
    ),
    split: str = typer.Option(
        None,
        help="Split to train on (default: train, or every image if the dataset has none).",
    ),
    steps: int = typer.Option(None, help="Steps of the stage (of every stage with 'all')."),
    batch_size: int = typer.Option(
        None, help="Batch size (default: the reference value of the stage)."
    ),
    lr: float = typer.Option(None, help="Learning rate (default: the reference 2e-5)."),
    seed: int = typer.Option(0, help="Seed of the initialisation, data order and noise."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue exactly where the stage's last checkpoint stopped."
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override any stage field, e.g. --set stage1.sample_every=200 (repeatable).",
    ),
    data_format: str = typer.Option(
        "auto", "--format", help="auto, market, deepfashion or folder."
    ),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train a stage and write `OUT/weights` (a weights folder that `from_pretrained` loads)."""
    from dpig_core.config import get_preset
    from dpig_core.data.readers import read_dataset
    from dpig_core.train.config import MappingConfig, PoseAEConfig, Stage1Config
    from dpig_core.train.run import STAGES, pick_device, run_stage, start_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not data.exists():
        fail(f"--data {data}: no such folder")
    try:
        config = get_preset(preset)
        index = read_dataset(data, format=data_format)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    chosen = split or ("train" if index.split("train") else None)
    records = index.split(chosen) if chosen else index.records
    if not records:
        fail(f"{data}: no images in split {chosen!r}")
    overrides = _parse_sets(set_)
    common = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    defaults = {"stage1": Stage1Config(), "pose-ae": PoseAEConfig(), "mappings": MappingConfig()}
    order = STAGES if stage == StageChoice.all else tuple(s for s in STAGES if s == stage.value)
    try:
        model = start_model(config, out, init, seed)
        for name in order:
            stage_config = defaults[name].with_overrides(**{**common, **overrides.get(name, {})})
            console.print(f"[bold]{name}[/]: {stage_config.to_dict()}")
            result = run_stage(name, model, records, stage_config, out, device=pick_device(device),
                               resume=resume, progress=progress)  # fmt: skip
            console.print(f"{name} done: {json.dumps(result)}")
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(f"weights: {out / 'weights'}")
