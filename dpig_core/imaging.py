"""Images for people to look at: tensors ↔ uint8 arrays, contact sheets, skeletons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from dpig_core.pose import LIMBS

UInt8Image = npt.NDArray[np.uint8]


def to_uint8(x: Any) -> UInt8Image:
    """A float tensor [3, H, W] in [−1, 1] → uint8 [H, W, 3] (clipped: the decoder has no tanh)."""
    import torch

    t = x.detach().float().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x).float()
    scaled = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out: UInt8Image = scaled.permute(1, 2, 0).numpy()
    return out


def skeleton(rcv: npt.NDArray[np.float32], height: int, width: int) -> UInt8Image:
    """A stick figure of a pose on black, for the header row of a pose grid."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for i, (a, b) in enumerate(LIMBS[:17]):
        if rcv[a, 2] > 0 and rcv[b, 2] > 0:
            hue = int(255 * i / 17)
            colour = (hue, 255 - hue, 160)
            draw.line([(rcv[a, 1], rcv[a, 0]), (rcv[b, 1], rcv[b, 0])], fill=colour, width=1)
    for r, c, v in rcv:
        if v > 0:
            draw.point((float(c), float(r)), fill=(255, 255, 255))
    return np.asarray(img, dtype=np.uint8)


def contact_sheet(
    rows: Sequence[Sequence[UInt8Image | None]], *, scale: int = 1, gap: int = 2
) -> UInt8Image:
    """Tiles in rows (None leaves a blank tile), separated by `gap` pixels, upscaled by `scale`."""
    tile = next(t for row in rows for t in row if t is not None)
    h, w = tile.shape[:2]
    cols = max(len(row) for row in rows)
    sheet = np.full(((h + gap) * len(rows) + gap, (w + gap) * cols + gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if t is not None:
                y, x = gap + i * (h + gap), gap + j * (w + gap)
                sheet[y : y + h, x : x + w] = t
    if scale > 1:
        sheet = sheet.repeat(scale, axis=0).repeat(scale, axis=1)
    return sheet


def save_png(path: Path, image: UInt8Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
