"""uint8 conversion of a whole micro-batch, and the image encoders."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dpig_core.imaging import to_uint8
from service.encoding import encode_uint8, to_uint8_batch
from service.specs import OutputFormat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_conversion_matches_the_per_image_one(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    images = (torch.randn(5, 3, 16, 8, generator=generator) * 0.9).to(dtype)
    images[0, 0, 0, :4] = torch.tensor([-1.5, 1.5, 0.0, -1.0])  # clipped, and exact ends
    given = images.clone()
    batch = to_uint8_batch(images)
    assert torch.equal(images, given)  # the model's tensor is left as it was
    assert batch.shape == (5, 16, 8, 3)
    for image, pixels in zip(images, batch, strict=True):
        assert (pixels == to_uint8(image)).all()
    assert batch[0, 0, :4, 0].tolist() == [0, 255, 128, 0]


def test_lossless_formats_keep_the_pixels_and_lossy_ones_come_close() -> None:
    pixels = to_uint8_batch(torch.rand(1, 3, 32, 16) * 2 - 1)[0]
    for options in (
        {},
        {"format": "png", "compress_level": 0},
        {"format": "webp", "lossless": True},
    ):
        decoded = Image.open(io.BytesIO(encode_uint8(pixels, OutputFormat(**options))))
        assert (np.asarray(decoded.convert("RGB")) == pixels).all()
    jpeg = encode_uint8(pixels, OutputFormat(format="jpeg", quality=95))
    assert Image.open(io.BytesIO(jpeg)).size == (16, 32)
