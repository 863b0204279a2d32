"""Pieces every training stage shares: a resumable batch stream, checkpoints, the metrics log,
the progress bar and sample grids."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dpig_core.data.dataset import Sample, collate_skipping
from dpig_core.imaging import contact_sheet, save_png, to_uint8

log = logging.getLogger(__name__)


class BatchStream:
    """Endless shuffled batches over `size` items: epoch e uses a permutation seeded by (seed, e).

    Its whole state is (epoch, position), saved in checkpoints, so a resumed run reads exactly the
    batches the uninterrupted run would have read.
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def next_indices(self, count: int | None = None) -> list[int]:
        out: list[int] = []
        need = count or self.batch_size
        while len(out) < need:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(need - len(out), self.size - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


class BatchLoader:
    """Batches of a PersonDataset from a BatchStream, moved to `device`; counts corrupt items.

    A batch that loses items to unreadable images is topped up from the stream. If more than
    `max_bad_fraction` of the items read so far were bad, training stops with an error rather
    than go on with a dataset that is mostly garbage.
    """

    def __init__(
        self,
        dataset: Any,
        stream: BatchStream,
        device: torch.device,
        max_bad_fraction: float = 0.2,
    ) -> None:
        self.dataset, self.stream, self.device = dataset, stream, device
        self.max_bad_fraction = max_bad_fraction
        self.read = 0
        self.bad = 0

    def next(self) -> Sample:
        parts: list[Sample] = []
        have = 0
        while have < self.stream.batch_size:
            items = [
                self.dataset[i] for i in self.stream.next_indices(self.stream.batch_size - have)
            ]
            batch = collate_skipping(items)
            self.read += len(items)
            self.bad += int(batch.pop("skipped"))
            if self.read >= 32 and self.bad > self.max_bad_fraction * self.read:
                raise RuntimeError(
                    f"{self.bad} of the {self.read} images read so far could not be decoded; the "
                    "dataset looks corrupt (run `dpig data index` on it)"
                )
            if batch:
                parts.append(batch)
                have += len(batch["image"])
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v.to(self.device, non_blocking=True) for k, v in merged.items()}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class MetricsLog:
    """Append-only JSONL: one line per logged step, flushed at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


def autocast(device: torch.device, cpu_bf16: bool = False) -> Any:
    """bf16 mixed precision on CUDA, and on the CPU when `cpu_bf16`; full precision otherwise."""
    if device.type == "cuda" or (cpu_bf16 and device.type == "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def progress_bar(
    description: str, total: int, start: int, enabled: bool
) -> Iterator[Callable[..., None]]:
    """Yields `advance(**fields)`; the bar shows step, losses and images/s."""
    if not enabled:
        yield lambda **_: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, completed=start, stats="")

        def advance(**stats: float) -> None:
            text = "  ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
            )
            bar.update(task, advance=1, stats=text)

        yield advance


class Throughput:
    """Items per second over the whole run so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.items = 0

    def add(self, n: int) -> float:
        self.items += n
        return self.items / max(time.perf_counter() - self.start, 1e-9)


def save_grid(path: Path, columns: Sequence[torch.Tensor], rows: int = 8) -> None:
    """PNG grid: one row per item, one column per tensor ([B, 3, H, W] in [−1, 1])."""
    n = min(rows, *(len(c) for c in columns))
    save_png(path, contact_sheet([[to_uint8(col[i]) for col in columns] for i in range(n)]))


def finite_or_raise(name: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{name} became {value} at step {step}; lower the learning rate")
