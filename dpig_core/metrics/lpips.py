"""LPIPS v0.1 with the AlexNet trunk (`lpips.LPIPS(net='alex')`, the GFLA/PIDM setting).

Two files, neither bundled nor downloadable here, both hash-checked at load:

* torchvision's ImageNet AlexNet `alexnet-owt-7be5be79.pth` for the trunk (only `features.*` is
  used; `classifier.*` keys are allowed and ignored). Torch-hub file names carry the first 8 hex
  digits of the file's SHA-256, so the default check is the prefix `7be5be79`; pass
  `alexnet_sha256` to pin the full digest.
* the `lpips` package's linear heads `lpips/weights/v0.1/alex.pth` (6,009 bytes, keys
  `lin{0..4}.model.1.weight`). Its full SHA-256 `LPIPS_HEADS_SHA256` is the one recorded in the
  RECORD file of the `lpips-0.1.4` wheel on PyPI (base64 `33MoXjWy…`); torchmetrics mirrors the
  same file as `LPIPS_v0.1_alex-df73285e.pth`.

Computation (lpips 0.1.4 `LPIPS.forward`, version 0.1, spatial=False): inputs in [−1, 1] are
shifted and scaled per channel, passed through AlexNet `features[0:12]`, the outputs after the 5
ReLUs are unit-normalised over channels, squared differences go through the 1×1 heads, are
averaged spatially and summed over the 5 layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpig_core.metrics.gated import MetricUnavailable, check_weights_file, load_state_dict_file

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_SHA256_PREFIX = "7be5be79"
LPIPS_HEADS_FILE = "lpips/weights/v0.1/alex.pth"
LPIPS_HEADS_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"
LPIPS_HEADS_BYTES = 6009
CHANNELS = (64, 192, 384, 256, 256)
# lpips ScalingLayer: (x − shift) / scale maps [−1, 1] inputs to ImageNet-normalised ones.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
LPIPS_HINT = (
    f"LPIPS needs torchvision's {ALEXNET_FILE} and the lpips package's {LPIPS_HEADS_FILE}; "
    "pass both files; they are not bundled and cannot be downloaded here"
)
# Indices of torchvision AlexNet `features` after which lpips taps a ReLU output.
_TAPS = (1, 4, 7, 9, 11)


def alexnet_features() -> nn.Sequential:
    """torchvision AlexNet `features[0:12]` (the trailing max pool is not used by LPIPS)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


class _Head(nn.Module):
    # Index 1 keeps lpips' key names (`model.0` is a Dropout there, inactive in eval).
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LinearHeads(nn.Module):
    """The five 1×1 heads, named as in lpips' state dict (`lin{k}.model.1.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        for k, c in enumerate(CHANNELS):
            self.add_module(f"lin{k}", _Head(c))

    def head(self, k: int) -> nn.Module:
        return self.get_submodule(f"lin{k}.model")


class LPIPSAlex(nn.Module):
    """LPIPS distance: a, b [B, 3, H, W] in [−1, 1] → [B]."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.features = alexnet_features()
        self.heads = LinearHeads()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 5 ReLU outputs, each unit-normalised over channels (eps 1e-10 on the norm)."""
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dev = self.shift.device
        fa, fb = self.taps(a.to(dev, torch.float32)), self.taps(b.to(dev, torch.float32))
        total = torch.zeros(a.shape[0], device=dev)
        for k, (x, y) in enumerate(zip(fa, fb, strict=True)):
            total = total + self.heads.head(k)((x - y) ** 2).mean(dim=(1, 2, 3))
        return total


def load_lpips(
    alexnet_path: str | Path | None,
    heads_path: str | Path | None,
    *,
    alexnet_sha256: str | None = None,
    heads_sha256: str = LPIPS_HEADS_SHA256,
    device: str | torch.device = "cpu",
) -> LPIPSAlex:
    """Build LPIPS(alex, v0.1) from the two weight files, strictly, in eval mode.

    Raises MetricUnavailable when a path is None or missing, when the AlexNet file's SHA-256 does
    not start with ALEXNET_SHA256_PREFIX (or differs from `alexnet_sha256`), when the heads file's
    SHA-256 differs from `heads_sha256`, or when the tensors do not fit.
    """
    alex = check_weights_file(alexnet_path, what="LPIPS backbone", hint=LPIPS_HINT,
                              sha256_prefix=ALEXNET_SHA256_PREFIX,
                              expected_sha256=alexnet_sha256)  # fmt: skip
    heads = check_weights_file(heads_path, what="LPIPS heads", hint=LPIPS_HINT,
                               expected_sha256=heads_sha256)  # fmt: skip
    model = LPIPSAlex()
    state = load_state_dict_file(alex)
    other = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
    if other:
        raise MetricUnavailable(f"{alex}: unexpected keys {other[:5]} for torchvision AlexNet")
    try:
        model.features.load_state_dict(
            {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")},
            strict=True,
        )
        model.heads.load_state_dict(load_state_dict_file(heads), strict=True)
    except RuntimeError as err:
        raise MetricUnavailable(f"LPIPS weights do not fit AlexNet/v0.1 heads ({err})") from err
    return model.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def lpips(a: torch.Tensor, b: torch.Tensor, model: LPIPSAlex) -> torch.Tensor:
    """LPIPS per image pair: a, b [B, 3, H, W] in [−1, 1] → [B] (float32, on model's device).

    uint8-valued images map to [−1, 1] as x/127.5 − 1 (lpips' `im2tensor`). For mask-LPIPS
    (Market), the caller masks both images first (`masked.apply_mask`)."""
    out: torch.Tensor = model(a, b)
    return out


__all__ = [
    "ALEXNET_FILE",
    "ALEXNET_SHA256_PREFIX",
    "LPIPSAlex",
    "LPIPS_HEADS_FILE",
    "LPIPS_HEADS_SHA256",
    "MetricUnavailable",
    "alexnet_features",
    "load_lpips",
    "lpips",
]
