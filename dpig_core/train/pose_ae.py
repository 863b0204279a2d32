"""The pose auto-encoder: 54 normalised keypoint numbers → 32-d code → back (spec §4, model 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpig_core.models import DPIG
from dpig_core.pose import normalize_rcv
from dpig_core.train.config import PoseAEConfig
from dpig_core.train.loop import (
    BatchStream,
    MetricsLog,
    finite_or_raise,
    load_checkpoint,
    progress_bar,
    rng_state,
    save_checkpoint,
    set_lr,
    set_rng_state,
)

CHECKPOINT = "checkpoints/pose_ae.pt"


def train_pose_ae(
    model: DPIG,
    poses: torch.Tensor,
    cfg: PoseAEConfig,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """poses: [N, 18, 3] RCV in pixels of the model's frame. Loss: 20·MSE against the input."""
    h, w = model.config.height, model.config.width
    inputs = normalize_rcv(poses, h, w).to(device)  # [N, 54]
    ae = model.pose_ae.to(device).train()
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), eps=1e-8)
    stream = BatchStream(len(inputs), cfg.batch_size, cfg.seed)
    ckpt_path = run_dir / CHECKPOINT
    start = 0
    if resume:
        state = load_checkpoint(ckpt_path)
        ae.load_state_dict(state["pose_ae"])
        opt.load_state_dict(state["opt"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        start = state["step"]
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    last: dict[str, Any] = {}
    with progress_bar("pose AE", cfg.steps, start, progress) as advance:
        for step in range(start, cfg.steps):
            set_lr(opt, cfg.lr_at(step))
            x = inputs[stream.next_indices()]
            loss = cfg.mse_weight * torch.mean((ae(x) - x) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            finite_or_raise("pose_loss", value, step)
            advance(loss=value)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                last = {"stage": "pose_ae", "step": done, "lr": cfg.lr_at(step), "loss": value}
                metrics_log.write(last)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(ckpt_path, {
                    "stage": "pose_ae", "step": done, "pose_ae": ae.state_dict(),
                    "opt": opt.state_dict(), "stream": stream.state_dict(), "rng": rng_state(),
                    "train_config": cfg.to_dict(),
                })  # fmt: skip
    return last
