"""Model output → image bytes: uint8 conversion on the model's device, then PNG/WebP/JPEG.

`to_uint8_batch` is `dpig_core.imaging.to_uint8` for a whole micro-batch, done where the tensor
lives (on CUDA: one small uint8 copy into pinned memory instead of a float one), so the bytes do
not depend on where it ran. `encode_uint8` is what the encode pool runs; PIL releases the GIL
while it compresses (bench/encode_gil.py), so threads share the work.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.specs import OutputFormat

DEFAULT_PNG_LEVEL = 6  # zlib's default, which PIL used before the level was a job option
DEFAULT_QUALITY = 90
# libwebp's effort 0: 4× (lossy) to 100× (lossless) faster than its default of 4 here, for files
# a few per cent larger (bench/encode_gil.py); a batch service is bound by encoding speed
WEBP_METHOD = 0


def to_uint8_batch(images: Any) -> npt.NDArray[np.uint8]:
    """[B, 3, H, W] float in [−1, 1] on any device → uint8 [B, H, W, 3] numpy (clipped, rounded
    half to even, as `to_uint8`)."""
    import torch

    with torch.no_grad():
        # the same float32 operations in the same order as to_uint8, in place in one new buffer
        source = images.detach()
        if source.dtype == torch.float32:
            scaled = source.clamp(-1, 1)  # the copy and the clamp in one pass
        else:
            scaled = source.to(torch.float32).clamp_(-1, 1)
        scaled = scaled.add_(1).mul_(127.5).round_().to(torch.uint8)
        hwc = scaled.permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]
        if hwc.device.type != "cuda":
            out: npt.NDArray[np.uint8] = hwc.cpu().numpy()
            return out
        host = torch.empty(hwc.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(hwc, non_blocking=True)
        torch.cuda.current_stream(hwc.device).synchronize()
        return host.numpy()


def encode_uint8(pixels: npt.NDArray[np.uint8], fmt: OutputFormat) -> bytes:
    """uint8 [H, W, 3] → the bytes of one image file in `fmt` (no timestamps: reproducible)."""
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if fmt.format == "png":
        level = DEFAULT_PNG_LEVEL if fmt.compress_level is None else fmt.compress_level
        image.save(buf, format="PNG", compress_level=level)
    elif fmt.format == "webp":
        if fmt.lossless:
            image.save(buf, format="WEBP", lossless=True, exact=True, method=WEBP_METHOD)
        else:
            quality = DEFAULT_QUALITY if fmt.quality is None else fmt.quality
            image.save(buf, format="WEBP", quality=quality, method=WEBP_METHOD)
    else:
        quality = DEFAULT_QUALITY if fmt.quality is None else fmt.quality
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_and_hash(pixels: npt.NDArray[np.uint8], fmt: OutputFormat) -> tuple[bytes, str]:
    """One pool task: the image's bytes and their SHA-256 (the manifest's `sha256`)."""
    data = encode_uint8(pixels, fmt)
    return data, hashlib.sha256(data).hexdigest()
