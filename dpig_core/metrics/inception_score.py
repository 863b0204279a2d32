"""Inception Score with the TF Inception graph of 2015-12-05, as ported by pytorch-fid.

The weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF graph's weights,
including the 1008-way `softmax/logits` layer). They are not bundled and cannot be downloaded
here, so `load_inception_for_is` refuses to build the network unless the caller passes the file
and it hashes right. Torch-hub file names carry the first 8 hex digits of the file's SHA-256, so
by default the check is "the SHA-256 starts with 6726825d"; pass `expected_sha256` to pin the full
digest instead (torch-fidelity's identical `weights-inception-2015-12-05-6726825d.pth` is reported
with `REPORTED_FULL_SHA256`, which is not enforced because we have not hashed the file ourselves).

What is computed, against the OpenAI improved-GAN script that PG2/DPIG/PATN used
(`inception_score.py`: pool_3 features times the weight of `softmax/logits/MatMul`, softmax,
10 splits):

* logits = pool3 · Wᵀ **without the fc bias**: the script multiplies by the MatMul's weight input
  and never adds `softmax/biases` (torch-fidelity calls these 'logits_unbiased').
  `use_fc_bias=True` gives the biased logits instead.
* softmax over **all 1008** outputs, as the script does (the graph has 1008 classes: 1000 ImageNet
  classes, a background class and 7 unused ones); we do not cut to the first 1000.
* preprocessing `"pytorch-fid"` (default): x/255, `F.interpolate(bilinear, align_corners=False)`
  (half-pixel centres) to 299×299, then 2x − 1. `"tf1"` mimics the graph itself: TF1's legacy
  `ResizeBilinear` (source = destination · in/out, no half-pixel offset) then (x − 128)/128.
  Neither is bit-exact to the TF graph; report which one was used.
* Mask-IS (PG2/DPIG/PATN) is this score on the masked generated images; mask them first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dpig_core.metrics.gated import MetricUnavailable, check_weights_file, load_state_dict_file

IS_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch-hub convention: the 8 hex digits in the file name are the start of the file's SHA-256.
IS_WEIGHTS_SHA256_PREFIX = "6726825d"
REPORTED_FULL_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
NUM_CLASSES = 1008
INPUT_SIZE = 299
IS_HINT = (
    f"IS needs {IS_WEIGHTS_FILE}; pass --is-weights FILE; "
    "it is not bundled and cannot be downloaded here"
)

Preprocess = Literal["pytorch-fid", "tf1"]


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], **kw: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pooled branches → 224 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 → 17: stride-2 3×3, double 3×3 and max-pool branches."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions → 768 channels."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):  # fmt: skip
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 → 8: 3×3 and 7×7-then-3×3 stride-2 branches plus max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3 / 3×1 branches → 2048 channels.

    `pool="max"` is the FID/TF graph's Mixed_7c (pytorch-fid's FIDInceptionE_2), which max-pools
    where Mixed_7b (FIDInceptionE_1) average-pools."""

    def __init__(self, cin: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False)`: source = destination · in/out (no half-pixel
    offset), neighbours clamped at the border. [B, C, H, W] → [B, C, *size]."""

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo).to(x.device, x.dtype)

    r0, r1, fr = axis(x.shape[-2], size[0])
    c0, c1, fc = axis(x.shape[-1], size[1])
    rows = x[..., r0, :] + (x[..., r1, :] - x[..., r0, :]) * fr[:, None]
    return rows[..., c0] + (rows[..., c1] - rows[..., c0]) * fc


class InceptionV3ForIS(nn.Module):
    """The TF 2015-12-05 Inception-v3 with pytorch-fid's module names (its `fid_inception_v3()`:
    torchvision's Inception3 with aux_logits=False, num_classes=1008 and the FIDInceptionA/C/E_1/
    E_2 blocks), so pytorch-fid's state dict loads with strict=True.

    forward: uint8-valued images [B, 3, H, W] (0–255, any size) → logits [B, 1008].
    """

    def __init__(self, preprocess: Preprocess = "pytorch-fid", use_fc_bias: bool = False) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.use_fc_bias = use_fc_bias
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8-valued [B, 3, H, W] → network input [B, 3, 299, 299] in about [−1, 1]."""
        x = images.to(self.fc.weight.device, torch.float32)
        size = (INPUT_SIZE, INPUT_SIZE)
        if self.preprocess == "tf1":
            return (tf1_resize_bilinear(x, size) - 128) / 128
        x = F.interpolate(x / 255, size=size, mode="bilinear", align_corners=False)
        return 2 * x - 1

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared input [B, 3, 299, 299] → pool_3 features [B, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):  # fmt: skip
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.pool3(self.prepare(images))
        return F.linear(feats, self.fc.weight, self.fc.bias if self.use_fc_bias else None)


def load_inception_for_is(
    path: str | Path | None,
    expected_sha256: str | None = None,
    *,
    preprocess: Preprocess = "pytorch-fid",
    use_fc_bias: bool = False,
    device: str | torch.device = "cpu",
) -> InceptionV3ForIS:
    """Build the IS network from pytorch-fid's weights file, strictly, in eval mode.

    Raises MetricUnavailable when `path` is None or missing, or when the file's SHA-256 does not
    start with IS_WEIGHTS_SHA256_PREFIX (or differs from `expected_sha256` when given).
    """
    file = check_weights_file(path, what="Inception Score", hint=IS_HINT,
                              sha256_prefix=IS_WEIGHTS_SHA256_PREFIX,
                              expected_sha256=expected_sha256)  # fmt: skip
    model = InceptionV3ForIS(preprocess=preprocess, use_fc_bias=use_fc_bias)
    try:
        model.load_state_dict(load_state_dict_file(file), strict=True)
    except RuntimeError as err:
        raise MetricUnavailable(f"{file}: not pytorch-fid's Inception state dict ({err})") from err
    return model.to(device).eval().requires_grad_(False)


def inception_score_from_probs(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS of class probabilities [N, K] as the OpenAI script computes it: split the rows into
    `splits` consecutive parts (part i = rows ⌊iN/s⌋ … ⌊(i+1)N/s⌋), per part
    exp(mean_x KL(p(y|x) ‖ p(y))) with p(y) the part's mean; return the mean and the population
    std over parts. 0·log 0 counts as 0 (the script would give NaN for exact zeros)."""
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, K], got {tuple(probs.shape)}")
    n = probs.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {n}")
    p = probs.double()
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        py = part.mean(dim=0, keepdim=True)
        kl = torch.xlogy(part, part) - torch.xlogy(part, py.expand_as(part))
        scores.append(math.exp(kl.sum(dim=1).mean().item()))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


@torch.inference_mode()
def inception_probs(images: Iterable[torch.Tensor], model: InceptionV3ForIS) -> torch.Tensor:
    """Softmax over the 1008 logits for each batch of uint8-valued images [B, 3, H, W] →
    [N, 1008] float64 on the CPU, in input order."""
    probs = [F.softmax(model(batch).double(), dim=1).cpu() for batch in images]
    if not probs:
        raise ValueError("IS needs at least one image batch")
    return torch.cat(probs)


def inception_score(
    images: Iterable[torch.Tensor], model: InceptionV3ForIS, splits: int = 10
) -> tuple[float, float]:
    """(mean, std) Inception Score of uint8-valued image batches [B, 3, H, W], 10 splits by
    default as in the OpenAI script. Rows are split in input order: sort the files first."""
    return inception_score_from_probs(inception_probs(images, model), splits)


__all__ = [
    "IS_WEIGHTS_FILE",
    "IS_WEIGHTS_SHA256_PREFIX",
    "InceptionV3ForIS",
    "MetricUnavailable",
    "NUM_CLASSES",
    "inception_probs",
    "inception_score",
    "inception_score_from_probs",
    "load_inception_for_is",
    "tf1_resize_bilinear",
]
