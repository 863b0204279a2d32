"""Batched, deterministic inference on a trained DPIG (spec §7): sample new people, transfer poses,
swap factors, interpolate between people (in embedding space or through Φ inversion).

Determinism: every item's noise comes from its own generator, seeded by (job seed, item, factor),
drawn on the CPU, so it does not depend on the batch or the device. The networks always run on
micro-batches of exactly `batch_size` rows (a short last batch is padded by repeating its last
row): a row's result then does not depend on how many real rows share its batch, which it does
otherwise (CPU kernels split odd shapes differently, and a pixel can round the other way). Item i
of a job with seed s therefore gives the same pixels alone or inside any batch, for a given device,
precision and `batch_size`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dpig_core.config import DPIGConfig
from dpig_core.data.dataset import conditioning, image_to_tensor, load_person
from dpig_core.generate import Z_STD, decode_pose, map_z, render
from dpig_core.models import DPIG, factor_dims
from dpig_core.pose import FloatArray, PoseError, normalize_rcv
from dpig_core.weights import from_pretrained

Precision = Literal["fp32", "bf16", "fp16"]
InterpolationMethod = Literal["linear", "slerp", "inverse"]
FACTORS = ("fg", "bg", "pose")
_STREAM = {"fg": 1, "bg": 2, "pose": 3, "init": 4}
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, item: int, stream: str) -> int:
    """A 63-bit seed for one item's noise stream, well mixed so that neighbouring items and seeds
    share nothing."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (item & _MASK64))
    return _splitmix64(x ^ _STREAM[stream]) >> 1


def item_noise(seed: int, items: Sequence[int], stream: str, dim: int) -> torch.Tensor:
    """z ~ N(0, 0.2²) for each item, from the item's own generator (CPU): [len(items), dim]."""
    out = torch.empty(len(items), dim)
    gen = torch.Generator()
    for row, item in enumerate(items):
        gen.manual_seed(item_seed(seed, item, stream))
        out[row] = torch.randn(dim, generator=gen)
    return out * Z_STD


@dataclass
class Factors:
    """The factors of N people: fg [N, D_fg], bg [N, D_bg] (None for models without a background
    code), rcv [N, 18, 3] (the pose as keypoints, in pixels) and, where known, the pose code
    [N, D_pose]. Tensors live on the CPU in float32."""

    fg: torch.Tensor
    bg: torch.Tensor | None
    rcv: torch.Tensor
    pose: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.fg.shape[0])

    def select(self, index: Sequence[int] | torch.Tensor) -> Factors:
        """The people at `index` (repeats allowed), in that order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Factors(
            self.fg[idx],
            None if self.bg is None else self.bg[idx],
            self.rcv[idx],
            None if self.pose is None else self.pose[idx],
        )

    def mix(self, **others: Factors) -> Factors:
        """These people with some factors taken from `others` (same length or one person, which
        is repeated): `a.mix(bg=b, pose=c)`."""
        out = self
        for factor, source in others.items():
            if factor not in FACTORS:
                raise ValueError(f"unknown factor {factor!r}; expected one of {FACTORS}")
            if len(source) not in (1, len(self)):
                raise ValueError(f"{factor}: {len(source)} people for {len(self)}")
            src = source.select([0] * len(self)) if len(source) != len(self) else source
            if factor == "pose":
                out = replace(out, rcv=src.rcv, pose=src.pose)
            else:
                out = replace(out, **{factor: getattr(src, factor)})
        return out


@dataclass(frozen=True)
class Inversion:
    """z found for each target code, and ‖Φ(z) − e‖ per row before and after the descent."""

    z: torch.Tensor
    initial_distance: torch.Tensor
    final_distance: torch.Tensor


def _padded_batches(n: int, batch_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, rows, index) per micro-batch; index has exactly batch_size entries, the last
    real row repeated as padding."""
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        idx = torch.arange(start, start + batch_size).clamp_max(start + rows - 1)
        yield start, rows, idx


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per row: a, b [N, D], t [N] → [N, D]. Falls back to linear
    interpolation where the two vectors are (anti)parallel."""
    an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    omega = torch.acos((an * bn).sum(dim=1).clamp(-1, 1))[:, None]
    so = torch.sin(omega)
    t = t[:, None]
    linear = (1 - t) * a + t * b
    safe = so.abs() > 1e-6
    so = torch.where(safe, so, torch.ones_like(so))
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so
    return torch.where(safe, spherical, linear)


class DPIGPipeline:
    """Inference on one trained model, in fixed-size micro-batches on CPU or CUDA.

    Options: `precision` "bf16" / "fp16" autocasts the encoder and decoder (fp16 on CUDA only; Φ
    and the pose auto-encoder stay in fp32, because decoded keypoints are floored to pixels and a
    rounding change would move them); `channels_last` converts the convolutional networks;
    `compile` wraps the decoder in torch.compile (True, or the name of a backend);
    `images_on_device` leaves rendered images on the device (float32), for a caller that converts
    them there (the service's uint8 conversion), instead of copying them to the CPU.
    """

    def __init__(
        self,
        model: DPIG,
        *,
        device: torch.device | str = "cpu",
        precision: Precision = "fp32",
        batch_size: int = 32,
        channels_last: bool = False,
        compile: bool | str = False,
        images_on_device: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images_on_device = images_on_device
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, not {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.precision = precision
        self.batch_size = batch_size
        self.model = model.eval().requires_grad_(False).to(self.device)
        if channels_last:
            for net in (self.model.encoder, self.model.decoder):
                net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.channels_last = channels_last
        self._decoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.model.decoder
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self._decoder = torch.compile(self.model.decoder, backend=backend, dynamic=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> DPIGPipeline:
        """A pipeline on a weights folder (hashes verified; see `dpig_core.weights`)."""
        return cls(from_pretrained(path, device="cpu"), **options)

    @property
    def config(self) -> DPIGConfig:
        return self.model.config

    @property
    def factors(self) -> tuple[str, ...]:
        """The factors this model samples: fg, bg (Market-style models only), pose."""
        return tuple(factor_dims(self.config))

    # ------------------------------------------------------------------------------------------
    # micro-batching

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _run(
        self,
        fn: Callable[..., torch.Tensor],
        *inputs: torch.Tensor | None,
        on_device: bool = False,
    ) -> torch.Tensor:
        """fn over the rows of `inputs` in padded micro-batches of `batch_size`; float32 output on
        the CPU (on the device with `on_device`). None inputs are passed through as None."""
        n = next(t.shape[0] for t in inputs if t is not None)
        outputs = []
        for _, rows, idx in _padded_batches(n, self.batch_size):
            args = [None if t is None else t[idx].to(self.device) for t in inputs]
            out = fn(*args)[:rows].float()
            outputs.append(out if on_device else out.cpu())
        return torch.cat(outputs)

    # ------------------------------------------------------------------------------------------
    # building blocks

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, rcv: torch.Tensor) -> Factors:
        """Real people → their factors: images [N, 3, H, W] in [−1, 1] and their keypoints
        [N, 18, 3] in the model's frame."""
        cfg = self.config
        conds = [conditioning(r.numpy().astype(np.float32), cfg) for r in rcv]
        mask = torch.stack([c["mask"] for c in conds])
        boxes = torch.stack([c["boxes"] for c in conds])
        vis = torch.stack([c["vis"] for c in conds])

        def appearance(x: torch.Tensor, m: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> Any:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                return self.model.encoder(x, m, b, v)

        emb = self._run(appearance, images, mask, boxes, vis)
        pose = self._run(
            lambda r: self.model.pose_ae.encode(normalize_rcv(r, cfg.height, cfg.width)), rcv
        )
        fg, bg = emb[:, : cfg.fg_dim], (emb[:, cfg.fg_dim :] if cfg.has_bg else None)
        return Factors(fg, bg, rcv.float(), pose)

    def load_people(
        self, people: Sequence[tuple[Any, FloatArray | None]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image path or PIL-readable file, keypoints in that image's pixels) per person →
        images [N, 3, H, W] in [−1, 1] and keypoints [N, 18, 3], resized to the model's frame.
        Raises OSError / PoseError for an unreadable image or bad keypoints."""
        cfg = self.config
        images, poses = [], []
        for source, rcv in people:
            if rcv is None:
                raise PoseError(f"{source}: no keypoints")
            pixels, scaled = load_person(source, np.asarray(rcv, np.float32), cfg.height, cfg.width)
            images.append(image_to_tensor(pixels))
            poses.append(torch.from_numpy(scaled))
        return torch.stack(images), torch.stack(poses)

    @torch.inference_mode()
    def render(self, factors: Factors) -> torch.Tensor:
        """The people described by `factors`: [N, 3, H, W] float32, about [−1, 1], on the CPU
        (on the device with `images_on_device`)."""

        def decode(fg: torch.Tensor, bg: torch.Tensor | None, rcv: torch.Tensor) -> Any:
            with self._autocast():
                return render(self.model, fg, bg, rcv, decoder=self._decoder)

        return self._run(
            decode, factors.fg, factors.bg, factors.rcv, on_device=self.images_on_device
        )

    @torch.inference_mode()
    def map_noise(self, factor: str, z: torch.Tensor) -> torch.Tensor:
        """Φ_factor(z): [N, d] → [N, d]."""
        return self._run(lambda t: map_z(self.model, factor, t), z)

    @torch.inference_mode()
    def decode_poses(self, codes: torch.Tensor) -> torch.Tensor:
        """Pose codes [N, d] → keypoints [N, 18, 3] in pixels."""
        return self._run(lambda c: decode_pose(self.model, c), codes)

    @torch.inference_mode()
    def encode_poses(self, rcv: torch.Tensor) -> torch.Tensor:
        """Keypoints [N, 18, 3] → pose codes [N, d]."""
        cfg = self.config
        return self._run(
            lambda r: self.model.pose_ae.encode(normalize_rcv(r, cfg.height, cfg.width)), rcv
        )

    # ------------------------------------------------------------------------------------------
    # operations

    def sample_factors(
        self,
        items: Sequence[int],
        seed: int,
        *,
        per_identity: int | None = None,
        fixed: dict[str, Factors] | None = None,
    ) -> Factors:
        """The factors of the given items of a sampling job.

        Each factor is Φ(z) with z ~ N(0, 0.2²) from the item's own seed, or, when named in
        `fixed`, taken from that reference person (one person, repeated). A sampled pose decodes
        Φ_pose(z) (not a real pose, which the reference harness decoded: spec §7). With
        `per_identity` = K (the Virtual Market), items i and j share a foreground code when
        i // K == j // K, and background and pose vary per item.
        """
        fixed = fixed or {}
        unknown = set(fixed) - set(FACTORS)
        if unknown:
            raise ValueError(f"unknown factors {sorted(unknown)}; expected some of {FACTORS}")
        if per_identity is not None and per_identity < 1:
            raise ValueError(f"per_identity must be positive, not {per_identity}")
        dims = factor_dims(self.config)
        n = len(items)
        codes: dict[str, torch.Tensor | None] = {"bg": None}
        for factor, (dim, _) in dims.items():
            if factor in fixed:
                continue
            keys = list(items)
            if factor == "fg" and per_identity is not None:
                keys = [i // per_identity for i in items]
            codes[factor] = self.map_noise(factor, item_noise(seed, keys, factor, dim))
        pose_code = codes.get("pose")
        rcv = (
            self.decode_poses(pose_code)
            if pose_code is not None
            else torch.zeros(n, 18, 3)  # replaced by the fixed pose below
        )
        placeholder = torch.zeros(n, dims["fg"][0])
        fg = codes.get("fg")
        out = Factors(fg if fg is not None else placeholder, codes["bg"], rcv, pose_code)
        return out.mix(**fixed) if fixed else out

    def sample(
        self,
        items: Sequence[int],
        seed: int,
        *,
        per_identity: int | None = None,
        fixed: dict[str, Factors] | None = None,
    ) -> torch.Tensor:
        """Images of the given items of a sampling job: [len(items), 3, H, W] (see
        `sample_factors`)."""
        return self.render(self.sample_factors(items, seed, per_identity=per_identity, fixed=fixed))

    def transfer(
        self,
        sources: Factors,
        poses: torch.Tensor,
        pairs: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Sources (encoded once, by `encode`) in target poses [P, 18, 3]. Without `pairs`:
        every source in every pose, [S, P, 3, H, W]; with pairs (source, pose) → [K, 3, H, W]."""
        s, p = len(sources), int(poses.shape[0])
        if pairs is None:
            grid = [(i, j) for i in range(s) for j in range(p)]
        else:
            grid = list(pairs)
            bad = [(i, j) for i, j in grid if not (0 <= i < s and 0 <= j < p)]
            if bad:
                raise IndexError(f"pairs {bad[:3]} outside {s} sources × {p} poses")
        src = sources.select([i for i, _ in grid])
        rcv = poses[torch.as_tensor([j for _, j in grid], dtype=torch.long)].float()
        images = self.render(replace(src, rcv=rcv, pose=None))
        return images if pairs is not None else images.view(s, p, *images.shape[1:])

    def swap(self, fg: Factors, bg: Factors | None, pose: Factors) -> torch.Tensor:
        """Foreground of `fg`, background of `bg` (ignored by models without one) and pose of
        `pose`, row by row (a one-person argument is repeated): [N, 3, H, W]."""
        mixed = fg.mix(pose=pose, **({"bg": bg} if bg is not None and fg.bg is not None else {}))
        return self.render(mixed)

    def invert(
        self,
        factor: str,
        target: torch.Tensor,
        *,
        steps: int = 2000,
        lr: float = 0.05,
        seed: int = 0,
    ) -> Inversion:
        """z* = argmin ‖Φ(z) − e‖² per row, by Adam from z ~ N(0, 0.2²) with Φ frozen (spec §7):
        target [N, d] → z [N, d]. Rows are independent: each has its own loss term and Adam's
        update is element-wise."""
        if factor not in self.model.mappings:
            have = list(self.model.mappings)
            raise ValueError(f"no mapping for {factor!r}; this model has {have}")
        mapping = self.model.mappings[factor]
        e = target.float().clone().to(self.device)  # a normal tensor, even from inference mode
        z0 = item_noise(seed, list(range(len(e))), "init", e.shape[1]).to(self.device)
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, steps), eta_min=lr / 10
        )
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = (mapping(z) - e).pow(2).sum()
                loss.backward()
                opt.step()
                schedule.step()
        with torch.inference_mode():
            before = (mapping(z0) - e).norm(dim=1).cpu()
            after = (mapping(z.detach()) - e).norm(dim=1).cpu()
        return Inversion(z.detach().cpu(), before, after)

    def interpolate(
        self,
        a: Factors,
        b: Factors,
        steps: int,
        *,
        method: InterpolationMethod = "linear",
        factors: Sequence[str] = FACTORS,
        inversion_steps: int = 2000,
    ) -> torch.Tensor:
        """`steps` images from person `a` to person `b` (one person each): [steps, 3, H, W].

        Factors not in `factors` stay those of `a`. "linear" and "slerp" move through the
        embeddings (the pose through the pose auto-encoder's code); "inverse" finds z for each
        end by inverting Φ and moves linearly in z, decoding Φ(z), as in the paper's figure.
        """
        if len(a) != 1 or len(b) != 1:
            raise ValueError("interpolate takes one person at each end")
        if steps < 2:
            raise ValueError(f"steps must be at least 2, not {steps}")
        unknown = set(factors) - set(FACTORS)
        if unknown:
            raise ValueError(f"unknown factors {sorted(unknown)}; expected some of {FACTORS}")
        t = torch.linspace(0, 1, steps)
        ends = {
            "fg": (a.fg, b.fg),
            "pose": (self._pose_code(a), self._pose_code(b)),
        }
        if a.bg is not None and b.bg is not None:
            ends["bg"] = (a.bg, b.bg)
        path: dict[str, torch.Tensor] = {}
        for factor, (ea, eb) in ends.items():
            if factor not in factors:
                continue
            if method == "inverse":
                inv = self.invert(factor, torch.cat([ea, eb]), steps=inversion_steps)
                za, zb = inv.z[:1], inv.z[1:]
                path[factor] = self.map_noise(factor, za + t[:, None] * (zb - za))
            elif method == "slerp":
                path[factor] = slerp(ea.expand(steps, -1), eb.expand(steps, -1), t)
            elif method == "linear":
                path[factor] = ea + t[:, None] * (eb - ea)
            else:
                raise ValueError(f"method must be linear, slerp or inverse, not {method!r}")
        base = a.select([0] * steps)
        out = replace(base, fg=path.get("fg", base.fg), bg=path.get("bg", base.bg))
        if "pose" in path:
            out = replace(out, rcv=self.decode_poses(path["pose"]), pose=path["pose"])
        return self.render(out)

    def _pose_code(self, person: Factors) -> torch.Tensor:
        return person.pose if person.pose is not None else self.encode_poses(person.rcv)
