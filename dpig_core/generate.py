"""The functional core of generation (spec §7): encode, sample each factor through Φ, decode.

`dpig_core.pipeline` builds batched, deterministic jobs on top of these pure functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpig_core.models import DPIG, factor_dims
from dpig_core.pose import denormalize_rcv, normalize_rcv, pose_maps

Z_STD = 0.2  # Φ is trained on z ~ N(0, 0.2²); standard-normal z leaves its input range (§11.3)


def encode(model: DPIG, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real images → their factor codes: fg [B, 7·roi_dim], bg [B, bg_dim] (Market), pose [B, d]."""
    cfg = model.config
    emb = model.encoder(batch["image"], batch["mask"], batch["boxes"], batch["vis"])
    codes = {"fg": emb[:, : cfg.fg_dim]}
    if cfg.has_bg:
        codes["bg"] = emb[:, cfg.fg_dim :]
    codes["pose"] = model.pose_ae.encode(normalize_rcv(batch["rcv"], cfg.height, cfg.width))
    return codes


def sample_z(model: DPIG, factor: str, count: int, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """z ~ N(0, 0.2²) of the factor's dimension: [count, d]."""
    dim = factor_dims(model.config)[factor][0]
    source = generator.device if generator is not None else device
    z: torch.Tensor = torch.randn(count, dim, generator=generator, device=source)
    return z.to(device) * Z_STD


def map_z(model: DPIG, factor: str, z: torch.Tensor) -> torch.Tensor:
    """Φ_factor(z): [B, d] → [B, d]."""
    out: torch.Tensor = model.mappings[factor](z)
    return out


def decode_pose(model: DPIG, code: torch.Tensor) -> torch.Tensor:
    """Pose code [B, d] → RCV [B, 18, 3] in pixels (floored, invisible = (0, 0, 0))."""
    coords, vis = model.pose_ae.decode(code)
    return denormalize_rcv(coords.float(), vis.float(), model.config.height, model.config.width)


def render(
    model: DPIG,
    fg: torch.Tensor,
    bg: torch.Tensor | None,
    rcv: torch.Tensor,
    decoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode an image from fg (+ bg) codes and a pose: → [B, 3, H, W] in about [−1, 1].

    `decoder` replaces `model.decoder` (a compiled or channels-last copy of it)."""
    cfg = model.config
    if cfg.has_bg and bg is None:
        raise ValueError(f"model {cfg.name!r} needs a background code")
    parts = [fg, bg] if cfg.has_bg and bg is not None else [fg]
    maps = pose_maps(rcv, cfg.height, cfg.width, cfg.pose_radius).to(fg.dtype)
    net = decoder if decoder is not None else model.decoder
    out: torch.Tensor = net(torch.cat(parts, dim=1), maps)
    return out


def sample_people(model: DPIG, count: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """`count` new people with every factor sampled through Φ (pose via Φ_pose and the pose
    decoder, not the real pose the reference harness decoded, §11.4): [count, 3, H, W]."""
    codes = {
        f: map_z(model, f, sample_z(model, f, count, generator, device)) for f in model.mappings
    }
    return render(model, codes["fg"], codes.get("bg"), decode_pose(model, codes["pose"]))
