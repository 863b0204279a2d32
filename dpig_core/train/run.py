"""Run the training stages on a dataset and write a weights folder after each."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from dpig_core.config import DPIGConfig
from dpig_core.data.dataset import PersonDataset
from dpig_core.data.records import PersonRecord
from dpig_core.models import DPIG
from dpig_core.train.config import MappingConfig, PoseAEConfig, Stage1Config
from dpig_core.train.mappings import embedding_bank, train_mappings
from dpig_core.train.pose_ae import train_pose_ae
from dpig_core.train.stage1 import train_stage1
from dpig_core.weights import from_pretrained, save_pretrained

log = logging.getLogger(__name__)

Stage = Literal["stage1", "pose-ae", "mappings"]
STAGES: tuple[Stage, ...] = ("stage1", "pose-ae", "mappings")
WEIGHTS_DIR = "weights"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def start_model(config: DPIGConfig, run_dir: Path, init: Path | None, seed: int) -> DPIG:
    """The model to continue from: `init`, else this run's own weights, else a fresh init."""
    source = init or (run_dir / WEIGHTS_DIR if (run_dir / WEIGHTS_DIR).is_dir() else None)
    if source is not None:
        model = from_pretrained(source)
        if model.config != config:
            raise ValueError(
                f"{source} holds a {model.config.name!r} model, not the requested {config.name!r}"
            )
        return model
    torch.manual_seed(seed)
    return DPIG(config)


def run_stage(
    stage: Stage,
    model: DPIG,
    records: Sequence[PersonRecord],
    stage_config: Stage1Config | PoseAEConfig | MappingConfig,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    cache: bool = True,
) -> dict[str, Any]:
    """Train one stage, then save the whole model to `run_dir/weights`. Returns its last metrics."""
    started = time.perf_counter()
    dataset = PersonDataset(records, model.config, cache=cache)
    if stage == "stage1":
        assert isinstance(stage_config, Stage1Config)
        result = train_stage1(model, dataset, stage_config, run_dir, device=device,
                              resume=resume, progress=progress)  # fmt: skip
    elif stage == "pose-ae":
        assert isinstance(stage_config, PoseAEConfig)
        found = (dataset.pose_of(i) for i in range(len(dataset)))
        poses = torch.stack([torch.from_numpy(p) for p in found if p is not None])
        result = train_pose_ae(model, poses, stage_config, run_dir, device=device,
                               resume=resume, progress=progress)  # fmt: skip
    else:
        assert isinstance(stage_config, MappingConfig)
        bank = embedding_bank(model, dataset, device)
        result = train_mappings(model, bank, stage_config, run_dir, device=device,
                                resume=resume, progress=progress)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started, 1)
    save_pretrained(model.to("cpu"), run_dir / WEIGHTS_DIR,
                    metadata={"trained_stages": _trained(run_dir, stage)})  # fmt: skip
    return result


def _trained(run_dir: Path, stage: Stage) -> list[str]:
    done = [s for s in STAGES if (run_dir / "checkpoints" / f"{s.replace('-', '_')}.pt").is_file()]
    return sorted(set(done) | {stage}, key=STAGES.index)
