"""A learned pose probe: how far generated people are from the pose they were asked for.

No pretrained pose estimator works on 64×32 synthetic people, so this is a small CNN keypoint
estimator trained on dpig's own synthetic people (`dpig_core.data.synth`), which carry exact COCO-18
ground truth. `estimate` reads the 18 keypoints of (generated) images; `pose_error` compares them
with the requested poses (mean distance, PCK, visibility agreement).

It was trained on synthetic people only: on real photographs its estimates mean nothing.

Coordinates follow `dpig_core.pose` (RCV, pixels), with pixel k spanning [k, k + 1) as in the
renderer (a keypoint at row r is drawn inside pixel ⌊r⌋); heatmap cell i covers input pixels
[2i, 2i + 2), centre 2i + 1.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dpig_core.pose import NUM_KEYPOINTS

log = logging.getLogger(__name__)

PROBE_FORMAT = "dpig-pose-probe/1"
PROBE_JSON = "probe.json"
PROBE_WEIGHTS = "probe.safetensors"
DEFAULT_PROBE = Path(__file__).resolve().parents[2] / "models" / "pose-probe-synth-64x32"
STRIDE = 2  # heatmaps are predicted at half the input resolution
# COCO-18 index of each keypoint's mirror image: right and left swap, the midline stays.
FLIP_ORDER = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
REFINE_RADIUS = 2  # heatmap cells around the argmax that the sub-pixel soft-argmax averages over


class ProbeError(RuntimeError):
    """A probe folder that is missing, unreadable, or does not match its recorded hash."""


@dataclass(frozen=True)
class ProbeConfig:
    """Input size the probe was trained for, its width and the heatmap target's spread.

    `sigma` is the standard deviation of the Gaussian heatmap target, in input pixels.
    """

    height: int = 64
    width: int = 32
    channels: int = 32
    sigma: float = 2.0

    def __post_init__(self) -> None:
        if self.height % 4 or self.width % 4 or self.height < 16 or self.width < 8:
            raise ValueError(
                f"probe size {self.height}x{self.width} must be multiples of 4, at least 16x8"
            )
        if self.channels < 8 or self.sigma <= 0:
            raise ValueError(f"bad probe config: channels {self.channels}, sigma {self.sigma}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> ProbeConfig:
        return ProbeConfig(
            height=int(data["height"]),
            width=int(data["width"]),
            channels=int(data["channels"]),
            sigma=float(data["sigma"]),
        )


# --------------------------------------------------------------------------------------------------
# The network


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(8, cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels, dilation=dilation),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.GroupNorm(8, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class PoseProbe(nn.Module):
    """[B, 3, H, W] in [−1, 1] → heatmap logits [B, 18, H/2, W/2] and visibility logits [B, 18].

    Fully convolutional: a stride-2 stem, a quarter-resolution trunk with dilated residual blocks
    (its receptive field covers the whole person, which left/right needs when the person faces
    away), and a skip back to half resolution for the heatmaps. GroupNorm, not BatchNorm, so
    train and eval behave the same on images unlike the training batches.
    """

    def __init__(self, config: ProbeConfig | None = None) -> None:
        super().__init__()
        self.config = config or ProbeConfig()
        c = self.config.channels
        # What `train_pose_probe` did; `save_probe` records it.
        self.training_record: dict[str, Any] = {}
        self.stem = nn.Sequential(_conv(3, c // 2), _conv(c // 2, c, stride=2), _Residual(c))
        self.down = _conv(c, 2 * c, stride=2)
        self.trunk = nn.Sequential(
            _Residual(2 * c, 1), _Residual(2 * c, 2), _Residual(2 * c, 4), _Residual(2 * c, 1)
        )
        self.up = _conv(2 * c, c)
        self.fuse = _Residual(c)
        self.heatmap = nn.Conv2d(c, NUM_KEYPOINTS, 1)
        self.visibility = nn.Linear(4 * c, NUM_KEYPOINTS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.stem(images)  # [B, c, H/2, W/2]
        deep = self.trunk(self.down(half))  # [B, 2c, H/4, W/4]
        up = F.interpolate(deep, size=half.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.fuse(self.up(up) + half)
        pooled = torch.cat([deep.mean(dim=(2, 3)), deep.amax(dim=(2, 3))], dim=1)  # [B, 4c]
        return self.heatmap(feat), self.visibility(pooled)

    def keypoints(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoints [B, 18, 2] (row, col in input pixels) and visibility logits [B, 18]."""
        heat, vis = self(images)
        return decode_heatmaps(heat, STRIDE), vis


def parameter_count(probe: nn.Module) -> int:
    return sum(p.numel() for p in probe.parameters())


def decode_heatmaps(heat: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """Heatmap logits [B, K, h, w] → (row, col) [B, K, 2] in input pixels.

    Argmax, refined by a soft-argmax over the (2·REFINE_RADIUS + 1)² cells around it: sub-pixel,
    and unlike a global soft-argmax not pulled to the middle by a second mode (a left/right mix-up).
    """
    b, k, h, w = heat.shape
    flat = heat.reshape(b, k, h * w)
    idx = flat.argmax(dim=-1)
    peak_r, peak_c = idx // w, idx % w  # [B, K]
    rows = torch.arange(h, device=heat.device)[:, None]
    cols = torch.arange(w, device=heat.device)[None, :]
    near = ((rows - peak_r[..., None, None]).abs() <= REFINE_RADIUS) & (
        (cols - peak_c[..., None, None]).abs() <= REFINE_RADIUS
    )  # [B, K, h, w]
    prob = torch.softmax(heat.masked_fill(~near, float("-inf")).reshape(b, k, h * w), dim=-1)
    prob = prob.reshape(b, k, h, w)
    r = (prob.sum(dim=3) * rows[:, 0].to(heat.dtype)).sum(dim=2)
    c = (prob.sum(dim=2) * cols[0].to(heat.dtype)).sum(dim=2)
    return torch.stack([r, c], dim=-1) * stride + stride / 2


# --------------------------------------------------------------------------------------------------
# Synthetic training data


def render_synthetic(
    rng: np.random.Generator, count: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random synthetic people: images [B, 3, H, W] in [−1, 1] and RCV poses [B, 18, 3].

    Each has its own identity, background, pose, camera and noise seed, drawn from `rng`.
    """
    from dpig_core.data.synth import render_person, sample_background, sample_identity, sample_pose

    images = np.empty((count, height, width, 3), dtype=np.uint8)
    poses = np.empty((count, NUM_KEYPOINTS, 3), dtype=np.float32)
    for i in range(count):
        identity = sample_identity(rng)
        background = sample_background(rng)
        pose = sample_pose(rng, height, width, height_scale=identity.build.height_scale)
        seed = int(rng.integers(2**31))
        camera = int(rng.integers(1, 7))
        images[i] = render_person(
            identity, pose, background, height, width, seed=seed, camera=camera
        )
        poses[i] = pose
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, torch.from_numpy(poses)


def flip_horizontal(images: torch.Tensor, rcv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror images [B, 3, H, W] and their poses [B, 18, 3]: columns c → W − c, and left and
    right keypoints swap labels (a mirrored person's right side is the original's left)."""
    width = images.shape[-1]
    out = rcv[:, list(FLIP_ORDER)].clone()
    visible = out[..., 2] > 0
    out[..., 1] = torch.where(visible, (width - out[..., 1]).clamp(0, width - 0.25), 0.0)
    return images.flip(-1), out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Blur [B, C, H, W] with a Gaussian of standard deviation `sigma` (scalar or [B]) pixels.

    σ ≤ 0.05 leaves an image as it is. Borders are reflected.
    """
    b, c, h, w = images.shape
    sig = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1)
    sig = sig.expand(b) if sig.numel() == 1 else sig
    radius = max(1, math.ceil(3 * float(sig.max())))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (t[None, :] / sig.clamp_min(0.05)[:, None]) ** 2)  # [B, k]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B·C, k]
    x = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    return x.reshape(b, c, h, w)


def heatmap_targets(rcv: torch.Tensor, config: ProbeConfig) -> torch.Tensor:
    """Normalised Gaussian targets [B, 18, H/2, W/2] (each map sums to 1) for RCV poses [B, 18, 3].

    Invisible keypoints get an all-zero map, which the loss ignores.
    """
    h, w = config.height // STRIDE, config.width // STRIDE
    centres_r = torch.arange(h, dtype=torch.float32) * STRIDE + STRIDE / 2
    centres_c = torch.arange(w, dtype=torch.float32) * STRIDE + STRIDE / 2
    dr = centres_r[:, None] - rcv[..., 0, None, None]  # [B, 18, h, 1]
    dc = centres_c[None, :] - rcv[..., 1, None, None]  # [B, 18, 1, w]
    g = torch.exp(-(dr**2 + dc**2) / (2 * config.sigma**2))
    g = g / g.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return g * (rcv[..., 2] > 0).to(g.dtype)[..., None, None]


def probe_loss(
    probe: PoseProbe, images: torch.Tensor, rcv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(heatmap loss, visibility loss) for images [B, 3, H, W] and their poses [B, 18, 3].

    The heatmap loss is the cross-entropy between the spatial softmax of each visible keypoint's
    logits and its Gaussian target; the visibility loss is BCE on the visibility logits.
    """
    heat, vis_logit = probe(images)
    target = heatmap_targets(rcv, probe.config)
    visible = (rcv[..., 2] > 0).to(heat.dtype)  # [B, 18]
    log_p = torch.log_softmax(heat.flatten(2), dim=-1)  # [B, 18, h·w]
    ce = -(target.flatten(2) * log_p).sum(dim=-1)  # [B, 18]
    heat_loss = (ce * visible).sum() / visible.sum().clamp_min(1.0)
    vis_loss = F.binary_cross_entropy_with_logits(vis_logit, visible)
    return heat_loss, vis_loss


def train_pose_probe(
    config: ProbeConfig,
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    *,
    lr: float = 2e-3,
    blur_probability: float = 0.6,
    max_blur_sigma: float = 1.5,
) -> PoseProbe:
    """Train a probe on synthetic people rendered on the fly at the probe's size.

    Adam with a cosine learning-rate decay; loss = heatmap cross-entropy + 0.5 · visibility BCE.
    Each batch is half rendered people, half their mirror images. A fraction `blur_probability`
    of the images is blurred with σ ~ U(0.3, max_blur_sigma), since generated images are blurrier
    than renders. Deterministic for a given seed and thread count.
    The per-step losses are kept in `probe.training_record["losses"]`.
    """
    from dpig_core.train.loop import progress_bar

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    with torch.random.fork_rng():  # seed the initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        probe = PoseProbe(config)
    rng = np.random.default_rng(seed)
    probe.train()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    losses: list[tuple[float, float]] = []
    with progress_bar("pose probe", steps, 0, progress) as advance:
        for _ in range(steps):
            # Half the batch is rendered, half is its mirror image: rendering costs as much CPU
            # as a training step, and mirrored people are just as valid.
            images, rcv = render_synthetic(rng, (batch_size + 1) // 2, config.height, config.width)
            mirrored, mirrored_rcv = flip_horizontal(images, rcv)
            images = torch.cat([images, mirrored])[:batch_size]
            rcv = torch.cat([rcv, mirrored_rcv])[:batch_size]
            blurred = rng.uniform(size=batch_size) < blur_probability
            if blurred.any():
                sigma = np.where(blurred, rng.uniform(0.3, max_blur_sigma, batch_size), 0.0)
                images = gaussian_blur(images, torch.from_numpy(sigma).float())
            heat_loss, vis_loss = probe_loss(probe, images, rcv)
            opt.zero_grad(set_to_none=True)
            (heat_loss + 0.5 * vis_loss).backward()
            opt.step()
            sched.step()
            losses.append((heat_loss.item(), vis_loss.item()))
            advance(heat=losses[-1][0], vis=losses[-1][1])
    probe.eval()
    probe.training_record = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr,
        "blur_probability": blur_probability,
        "max_blur_sigma": max_blur_sigma,
        "final_heatmap_loss": float(np.mean([h for h, _ in losses[-50:]])),
        "losses": losses,
    }
    log.info("pose probe: %d steps, final heatmap loss %.3f", steps, losses[-1][0])
    return probe


# --------------------------------------------------------------------------------------------------
# Saving and loading


def save_probe(
    probe: PoseProbe, directory: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write `probe.safetensors` and `probe.json` (config, how it was trained, weights SHA-256)."""
    from dpig_core.weights import sha256_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in probe.state_dict().items()}
    save_file(state, str(out / PROBE_WEIGHTS), metadata={"format": PROBE_FORMAT})
    record = {k: v for k, v in probe.training_record.items() if k != "losses"}
    info = {
        "format": PROBE_FORMAT,
        "config": probe.config.to_dict(),
        "parameters": parameter_count(probe),
        "training": record,
        "files": {PROBE_WEIGHTS: sha256_file(out / PROBE_WEIGHTS)},
        **({"metadata": dict(metadata)} if metadata else {}),
    }
    (out / PROBE_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def load_probe(directory: str | Path = DEFAULT_PROBE) -> PoseProbe:
    """Load a folder written by `save_probe`, in eval mode, after checking its weights hash."""
    from dpig_core.weights import sha256_file

    folder = Path(directory)
    meta_path, weights_path = folder / PROBE_JSON, folder / PROBE_WEIGHTS
    if not meta_path.is_file():
        raise ProbeError(f"{meta_path}: no probe description; is {folder} a pose-probe folder?")
    try:
        info = json.loads(meta_path.read_text())
        config = ProbeConfig.from_dict(info["config"])
        expected = str(info["files"][PROBE_WEIGHTS])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ProbeError(f"{meta_path}: not a valid probe description ({exc!r})") from None
    if info.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{meta_path}: unsupported format {info.get('format')!r}")
    if not weights_path.is_file():
        raise ProbeError(f"{weights_path}: missing")
    actual = sha256_file(weights_path)
    if actual != expected:
        raise ProbeError(
            f"{weights_path}: SHA-256 mismatch ({PROBE_JSON} {expected[:12]}…, file "
            f"{actual[:12]}…); the file is corrupt or was modified after it was saved"
        )
    probe = PoseProbe(config)
    try:
        probe.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as exc:
        raise ProbeError(f"{weights_path}: does not match the probe config ({exc})") from None
    probe.training_record = dict(info.get("training", {}))
    return probe.eval()


# --------------------------------------------------------------------------------------------------
# Estimating and scoring poses


def estimate(probe: PoseProbe, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Estimated RCV poses [B, 18, 3] (float32, CPU) of images [B, 3, H, W] in [−1, 1].

    A keypoint is visible when its visibility logit is > 0; invisible ones are (0, 0, 0). Images
    must have the probe's size (it was trained at one person scale).
    """
    h, w = probe.config.height, probe.config.width
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (h, w):
        raise ValueError(
            f"the probe reads [B, 3, {h}, {w}] images, got {list(images.shape)}; resize them first"
        )
    device = next(probe.parameters()).device
    was_training = probe.training
    probe.eval()
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            coords, vis_logit = probe.keypoints(chunk)
            coords[..., 0].clamp_(0, h - 1e-3)
            coords[..., 1].clamp_(0, w - 1e-3)
            visible = (vis_logit > 0).to(coords.dtype)
            out.append(torch.cat([coords * visible[..., None], visible[..., None]], -1).cpu())
    probe.train(was_training)
    if not out:
        return torch.zeros(0, NUM_KEYPOINTS, 3)
    return torch.cat(out)


def _as_array(x: Any) -> npt.NDArray[np.float64]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"poses must be [B, {NUM_KEYPOINTS}, 3], got shape {list(arr.shape)}")
    return arr


def pose_error(estimated: Any, requested: Any, height: int) -> dict[str, float | int]:
    """Compare estimated and requested RCV poses ([B, 18, 3] tensors or arrays, same frame).

    Over keypoints visible in both: `mean_px` (mean Euclidean distance in pixels), `mean_frac`
    (the same as a fraction of `height`), `pck_0.1` and `pck_0.05` (fraction within 0.1·height and
    0.05·height, inclusive); NaN where no keypoint is visible in both. Over all B·18 keypoints:
    `visibility_agreement` (fraction whose visible flags agree). Counts: `images`, `keypoints`
    (visible in both), `requested_visible`, `missed` (requested but estimated invisible),
    `spurious` (estimated but not requested).
    """
    est, req = _as_array(estimated), _as_array(requested)
    if est.shape != req.shape:
        raise ValueError(f"estimated {list(est.shape)} and requested {list(req.shape)} differ")
    if height <= 0:
        raise ValueError(f"height must be positive, got {height}")
    ev, rv = est[..., 2] > 0, req[..., 2] > 0
    both = ev & rv
    dist = np.linalg.norm(est[..., :2] - req[..., :2], axis=-1)[both]
    n = int(both.sum())
    nan = float("nan")
    mean_px = float(dist.mean()) if n else nan
    return {
        "mean_px": mean_px,
        "mean_frac": mean_px / height,
        "pck_0.1": float((dist <= 0.1 * height).mean()) if n else nan,
        "pck_0.05": float((dist <= 0.05 * height).mean()) if n else nan,
        "visibility_agreement": float((ev == rv).mean()) if ev.size else nan,
        "images": int(est.shape[0]),
        "keypoints": n,
        "requested_visible": int(rv.sum()),
        "missed": int((rv & ~ev).sum()),
        "spurious": int((ev & ~rv).sum()),
    }


def evaluate_on_synthetic(
    probe: PoseProbe, count: int, seed: int, blur_sigma: float = 0.0
) -> dict[str, float | int]:
    """`pose_error` of the probe on `count` freshly rendered synthetic people at its size, drawn
    from `numpy.random.default_rng(seed)` (seeds the training never uses: it draws from
    `default_rng(training_seed)`, a different stream), optionally blurred with σ = `blur_sigma`."""
    rng = np.random.default_rng([seed, 7919])
    images, rcv = render_synthetic(rng, count, probe.config.height, probe.config.width)
    if blur_sigma > 0:
        images = gaussian_blur(images, blur_sigma)
    return pose_error(estimate(probe, images), rcv, probe.config.height)
