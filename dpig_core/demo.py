"""The offline demo: synthetic source people in new poses, and new people sampled from noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpig_core.data.dataset import conditioning, image_to_tensor
from dpig_core.data.synth import render_person, sample_background, sample_identity, sample_pose
from dpig_core.generate import decode_pose, encode, map_z, render, sample_z, transfer
from dpig_core.imaging import contact_sheet, save_png, skeleton, to_uint8
from dpig_core.weights import from_pretrained, read_manifest


def _sources(count: int, height: int, width: int, rng: np.random.Generator) -> list[Any]:
    people = []
    for _ in range(count):
        pose = sample_pose(rng, height, width)
        pixels = render_person(sample_identity(rng), pose, sample_background(rng), height, width)
        people.append((pixels, pose))
    return people


@torch.inference_mode()
def run_demo(
    model_dir: Path,
    out: Path,
    *,
    sources: int = 4,
    poses: int = 6,
    identities: int = 4,
    per_identity: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    model = from_pretrained(model_dir)
    cfg = model.config
    h, w = cfg.height, cfg.width
    rng = np.random.default_rng(seed)

    # Pose grid: each source is encoded once and decoded in every target pose.
    people = _sources(sources, h, w, rng)
    targets = np.stack([sample_pose(rng, h, w) for _ in range(poses)])
    conds = [conditioning(pose, cfg) for _, pose in people]
    batch = {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
    batch["image"] = torch.stack([image_to_tensor(pixels) for pixels, _ in people])
    grid = transfer(model, encode(model, batch), torch.from_numpy(targets))  # [S, P, 3, H, W]
    grid_dir = out / "pose_grid"
    rows: list[list[Any]] = [[None, *(skeleton(t, h, w) for t in targets)]]
    for s, (pixels, _) in enumerate(people):
        row = [pixels]
        for p in range(poses):
            image = to_uint8(grid[s, p])
            save_png(grid_dir / f"source{s:02d}_pose{p:02d}.png", image)
            row.append(image)
        rows.append(row)
    grid_sheet = save_png(out / "pose_grid.png", contact_sheet(rows, scale=3))

    # Virtual Market: one fg code per identity; background and pose drawn per image.
    gen = torch.Generator().manual_seed(seed)
    n = identities * per_identity
    fg = map_z(model, "fg", sample_z(model, "fg", identities, gen)).repeat_interleave(
        per_identity, 0
    )
    bg = map_z(model, "bg", sample_z(model, "bg", n, gen)) if cfg.has_bg else None
    rcv = decode_pose(model, map_z(model, "pose", sample_z(model, "pose", n, gen)))
    images = render(model, fg, bg, rcv)
    sample_dir = out / "samples"
    sample_rows = []
    for i in range(identities):
        row = []
        for j in range(per_identity):
            image = to_uint8(images[i * per_identity + j])
            save_png(sample_dir / f"{i + 1:04d}_c1s1_{j:06d}_00.png", image)
            row.append(image)
        sample_rows.append(row)
    sample_sheet = save_png(out / "samples.png", contact_sheet(sample_rows, scale=3))
    return {
        "model": read_manifest(model_dir)["name"],
        "pose_grid_dir": grid_dir,
        "pose_grid_sheet": grid_sheet,
        "pose_grid_items": sources * poses,
        "sample_dir": sample_dir,
        "sample_sheet": sample_sheet,
        "sample_items": n,
    }
