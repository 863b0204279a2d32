"""Stage II: for each factor, a mapping Φ from z ~ N(0, 0.2²) to the embedding space, trained as a
WGAN with weight clipping against the embeddings of real training images (spec §5, models 3, 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpig_core.data.dataset import PersonDataset, in_order_batches
from dpig_core.generate import encode
from dpig_core.models import DPIG
from dpig_core.train.config import MappingConfig
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

CHECKPOINT = "checkpoints/mappings.pt"


@torch.no_grad()
def embedding_bank(
    model: DPIG, dataset: PersonDataset, device: torch.device, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """The frozen encoders' embeddings of every readable training image: factor → [N, d].

    The reference recomputes them on the fly each step; with frozen encoders and no augmentation the
    values are identical, so they are computed once.
    """
    model.to(device).eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in in_order_batches(dataset, batch_size):
        codes = encode(model, {k: v.to(device) for k, v in batch.items()})
        for factor, code in codes.items():
            parts.setdefault(factor, []).append(code.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items() if v}


def train_mappings(
    model: DPIG,
    bank: dict[str, torch.Tensor],
    cfg: MappingConfig,
    run_dir: Path,
    *,
    device: torch.device,
    factors: tuple[str, ...] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Each step, per factor: one Φ update (skipped at step 0), then n_critic critic updates with
    every critic weight clipped to [−clip, clip]. RMSProp (decay 0.9, eps 1e-10) for both."""
    factors = factors or tuple(k for k in model.mappings if k in bank)
    real = {f: bank[f].to(device) for f in factors}
    phis = {f: model.mappings[f].to(device).train() for f in factors}
    critics = {f: model.critics[f].to(device).train() for f in factors}

    def rmsprop(params: Any) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-10)

    opt_phi = {f: rmsprop(phis[f].parameters()) for f in factors}
    opt_critic = {f: rmsprop(critics[f].parameters()) for f in factors}
    streams = {
        f: BatchStream(len(real[f]), cfg.batch_size, cfg.seed + i) for i, f in enumerate(factors)
    }
    ckpt_path = run_dir / CHECKPOINT
    start = 0
    if resume:
        state = load_checkpoint(ckpt_path)
        for f in factors:
            phis[f].load_state_dict(state["phi"][f])
            critics[f].load_state_dict(state["critic"][f])
            opt_phi[f].load_state_dict(state["opt_phi"][f])
            opt_critic[f].load_state_dict(state["opt_critic"][f])
            streams[f].load_state_dict(state["stream"][f])
        set_rng_state(state["rng"])
        start = state["step"]

    def z_like(f: str) -> torch.Tensor:
        return torch.randn(cfg.batch_size, real[f].shape[1], device=device) * cfg.z_std

    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    last: dict[str, Any] = {}
    with progress_bar("mappings Φ", cfg.steps, start, progress) as advance:
        for step in range(start, cfg.steps):
            stats: dict[str, float] = {}
            for f in factors:
                set_lr(opt_phi[f], cfg.lr_at(step))
                set_lr(opt_critic[f], cfg.lr_at(step))
                if step > 0:
                    opt_phi[f].zero_grad(set_to_none=True)
                    phi_loss = -critics[f](phis[f](z_like(f))).mean()
                    phi_loss.backward()
                    opt_phi[f].step()
                    stats[f"{f}_phi_loss"] = phi_loss.item()
                for _ in range(cfg.n_critic):
                    with torch.no_grad():
                        fake = phis[f](z_like(f))
                    batch = real[f][streams[f].next_indices()]
                    opt_critic[f].zero_grad(set_to_none=True)
                    critic_loss = critics[f](fake).mean() - critics[f](batch).mean()
                    critic_loss.backward()
                    opt_critic[f].step()
                    with torch.no_grad():
                        for p in critics[f].parameters():
                            p.clamp_(-cfg.clip, cfg.clip)
                # −critic loss estimates the Wasserstein distance between real and Φ(z).
                stats[f"{f}_wdist"] = -critic_loss.item()
            for name, value in stats.items():
                finite_or_raise(name, value, step)
            advance(**{k: v for k, v in stats.items() if k.endswith("wdist")})
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                last = {"stage": "mappings", "step": done, "lr": cfg.lr_at(step), **stats}
                metrics_log.write(last)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(ckpt_path, {
                    "stage": "mappings", "step": done,
                    "phi": {f: phis[f].state_dict() for f in factors},
                    "critic": {f: critics[f].state_dict() for f in factors},
                    "opt_phi": {f: opt_phi[f].state_dict() for f in factors},
                    "opt_critic": {f: opt_critic[f].state_dict() for f in factors},
                    "stream": {f: streams[f].state_dict() for f in factors},
                    "rng": rng_state(), "train_config": cfg.to_dict(),
                })  # fmt: skip
    return last
