"""The learning curve of a run: its held-out figures (`stage1_heldout` lines of metrics.jsonl)
drawn as a PNG, one panel per figure, with the ceiling or floor as a dashed line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dpig_core.imaging import UInt8Image

PANELS = (
    ("ssim_dpig", "perfect_render_ssim_dpig", "reconstruction SSIM (DPIG)", "perfect render"),
    ("person_l1", "perfect_render_person_l1", "person L1", "perfect render"),
    ("leakage_ratio", "ground_truth_leakage_ratio", "bg-swap leakage ratio", "ground truth"),
)
WIDTH, HEIGHT, MARGIN = 360, 220, 40


def heldout_points(metrics: Path) -> list[dict[str, Any]]:
    """The held-out lines of a run's metrics.jsonl, by step (a resumed run's repeats: the last)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("stage") == "stage1_heldout":
            by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def _panel(
    points: Sequence[dict[str, Any]], key: str, ref: str, title: str, label: str
) -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    steps = [p["step"] for p in points]
    values = [p[key] for p in points]
    reference = points[-1][ref]
    low = min(0.0, *values, reference)
    high = max(*values, reference) * 1.05 or 1.0
    x0, x1, y0, y1 = MARGIN, WIDTH - 10, HEIGHT - 25, 25
    last = max(steps[-1], 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (x0 + (x1 - x0) * step / last, y0 + (y1 - y0) * (value - low) / (high - low))

    draw.rectangle((x0, y1, x1, y0), outline="black")
    draw.text((x0, 5), title, fill="black")
    for value in (low, (low + high) / 2, high):
        draw.text((2, xy(0, value)[1] - 5), f"{value:.2f}", fill="black")
    draw.text((x0, y0 + 5), "0", fill="black")
    draw.text((x1 - 40, y0 + 5), f"{last} steps", fill="black")
    ry = xy(0, reference)[1]
    for x in range(x0, x1, 8):
        draw.line((x, ry, min(x + 4, x1), ry), fill="gray")
    draw.text((x1 - 90, ry - 12), f"{label} {reference:.2f}", fill="gray")
    line = [xy(s, v) for s, v in zip(steps, values, strict=True)]
    if len(line) > 1:
        draw.line(line, fill="blue", width=2)
    for px, py in line:
        draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill="blue")
    draw.text((line[-1][0] - 40, line[-1][1] + 4), f"{values[-1]:.3f}", fill="blue")
    return img


def learning_curve(points: Sequence[dict[str, Any]]) -> UInt8Image:
    """One row of panels (SSIM, person L1, leakage) over the steps: uint8 (H, W, 3)."""
    if not points:
        raise ValueError("no held-out figures in this run (train with stage1.eval_every)")
    panels = [_panel(points, *panel) for panel in PANELS]
    sheet = Image.new("RGB", (WIDTH * len(panels), HEIGHT), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * WIDTH, 0))
    return np.asarray(sheet)
