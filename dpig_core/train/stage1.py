"""Stage I: reconstruction x → (fg, bg, pose) → x̂ with 20·L1 + DCGAN loss (spec §3.5, model 1)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dpig_core.data.dataset import PersonDataset, Sample
from dpig_core.metrics.heldout import heldout_figures, load_synthetic
from dpig_core.models import DPIG
from dpig_core.pose import pose_maps
from dpig_core.train.config import Stage1Config
from dpig_core.train.ema import EMA
from dpig_core.train.loop import (
    BatchLoader,
    BatchStream,
    MetricsLog,
    Throughput,
    autocast,
    finite_or_raise,
    load_checkpoint,
    progress_bar,
    rng_state,
    save_checkpoint,
    save_grid,
    set_lr,
    set_rng_state,
)

CHECKPOINT = "checkpoints/stage1.pt"


def reconstruct(model: DPIG, batch: Sample) -> torch.Tensor:
    """x̂ from the image's own embedding and its real pose maps: [B, 3, H, W]."""
    cfg = model.config
    maps = pose_maps(batch["rcv"], cfg.height, cfg.width, cfg.pose_radius)
    image = batch["image"].contiguous(memory_format=torch.channels_last)
    embedding = model.encoder(image, batch["mask"], batch["boxes"], batch["vis"])
    out: torch.Tensor = model.decoder(embedding, maps)
    return out


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(
        logits.float(), torch.full_like(logits.float(), target)
    )


def generator_step(
    model: DPIG, batch: Sample, cfg: Stage1Config, adversarial: bool
) -> tuple[dict[str, float], torch.Tensor]:
    """Backpropagate the G loss; returns its parts and the detached x̂ [B, 3, H, W]."""
    x = batch["image"]
    x_hat = reconstruct(model, batch)
    error = (x_hat.float() - x).abs()
    l1 = error.mean()
    # PoseMaskLoss of the reference: mean over all pixels of the error inside the pose mask.
    person_l1 = (error * batch["mask"]).mean()
    loss = cfg.l1_weight * l1 + cfg.person_l1_weight * person_l1
    stats = {"l1": l1.item(), "person_l1": person_l1.item()}
    if adversarial:
        if cfg.freeze_d_in_g_step:
            model.discriminator.requires_grad_(False)
        adv = _bce(model.discriminator(x_hat), 1.0)  # non-saturating
        loss = loss + cfg.adv_weight * adv
        stats["g_adv"] = adv.item()
    loss.backward()
    model.discriminator.requires_grad_(True)
    return {"g_loss": loss.item(), **stats}, x_hat.detach()


def discriminator_step(
    model: DPIG, batch: Sample, x_hat: torch.Tensor | None = None
) -> dict[str, float]:
    """One D loss on real images and their reconstructions (made here unless `x_hat` is given)."""
    if x_hat is None:
        with torch.no_grad():
            x_hat = reconstruct(model, batch)
    # Real and fake go through D separately, so each gets its own BatchNorm statistics (model 1).
    loss = 0.5 * (
        _bce(model.discriminator(batch["image"]), 1.0) + _bce(model.discriminator(x_hat), 0.0)
    )
    loss.backward()
    return {"d_loss": loss.item()}


def train_stage1(
    model: DPIG,
    dataset: PersonDataset,
    cfg: Stage1Config,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train encoder + decoder (jointly) against the discriminator; returns the last logged metrics.

    Per step (reference): one G update (skipped at step 0) and one D update, each on a fresh
    batch. The recipe options of `Stage1Config` change this: during `warmup_steps` G trains on
    L1 alone and D is not touched; `d_same_batch` gives D the G step's detached x̂; with
    `ema_decay` the weights saved at the end are the EMA of encoder + decoder.
    """
    # channels_last: ~25% faster convolutions on CPU (oneDNN) and on CUDA tensor cores.
    model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    generator_params = [*model.encoder.parameters(), *model.decoder.parameters()]
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(generator_params, lr=cfg.lr, betas=betas, eps=1e-8)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.lr, betas=betas, eps=1e-8)
    stream = BatchStream(len(dataset), cfg.batch_size, cfg.seed)
    loader = BatchLoader(dataset, stream, device)
    ema = EMA([model.encoder, model.decoder], cfg.ema_decay) if cfg.ema_decay else None
    heldout = load_synthetic(cfg.eval_data) if cfg.eval_every and cfg.eval_data else None
    ckpt_path = run_dir / CHECKPOINT
    start = 0
    if resume:
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "stage": "stage1", "step": step, "model": model.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "stream": stream.state_dict(), "rng": rng_state(), "train_config": cfg.to_dict(),
            "model_config": model.config.to_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {}),
        })  # fmt: skip

    def exported() -> Any:
        return ema.applied() if ema is not None else nullcontext()

    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    speed = Throughput()
    last: dict[str, Any] = {}
    with progress_bar("stage 1", cfg.steps, start, progress) as advance:
        for step in range(start, cfg.steps):
            set_lr(opt_g, cfg.lr_at(step))
            set_lr(opt_d, cfg.lr_at(step))
            stats: dict[str, float] = {}
            warm = step < cfg.warmup_steps
            x_hat = None
            images = 0
            if step > 0 or cfg.warmup_steps > 0:
                batch = loader.next()
                opt_g.zero_grad(set_to_none=True)
                with autocast(device, cfg.bf16_cpu):
                    g_stats, x_hat = generator_step(model, batch, cfg, step > cfg.warmup_steps)
                opt_g.step()
                if ema is not None:
                    ema.update()
                stats |= g_stats
                images += cfg.batch_size
            if not warm:
                if x_hat is None or not cfg.d_same_batch:
                    batch, x_hat = loader.next(), None
                    images += cfg.batch_size
                opt_d.zero_grad(set_to_none=True)
                with autocast(device, cfg.bf16_cpu):
                    stats |= discriminator_step(model, batch, x_hat)
                opt_d.step()
            for name, value in stats.items():
                finite_or_raise(name, value, step)
            images_per_s = speed.add(images)
            advance(**{k: stats[k] for k in ("l1", "d_loss") if k in stats}, img_s=images_per_s)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                last = {"stage": "stage1", "step": done, "lr": cfg.lr_at(step), **stats,
                        "images_per_s": images_per_s, "skipped_items": loader.bad}  # fmt: skip
                metrics_log.write(last)
            if heldout is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                rng = rng_state()  # scoring must not change what the run does next
                with torch.no_grad(), exported():
                    figures = heldout_figures(model, heldout, cfg.eval_images)
                model.train().requires_grad_(True)
                set_rng_state(rng)
                metrics_log.write({"stage": "stage1_heldout", "step": done, **figures})
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
                with torch.no_grad(), exported():
                    save_grid(run_dir / f"samples/stage1_{done:07d}.png",
                              [batch["image"], reconstruct(model, batch).float()])  # fmt: skip
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint(done)
    if ema is not None:
        ema.copy_to_modules()  # the weights run_stage saves are the EMA
    return last
