"""The model shipped in models/ is what the demo and the docs rely on: it must verify, load, and
come with its card and measured metrics."""

from __future__ import annotations

import json

import torch

from cli.demo import BUNDLED_MODEL
from dpig_core.generate import sample_people
from dpig_core.weights import INFERENCE_COMPONENTS, from_pretrained, verify

MAX_BYTES = 50 * 2**20


def test_bundled_model_verifies_and_is_small() -> None:
    manifest = verify(BUNDLED_MODEL)
    assert set(manifest["components"]) == set(INFERENCE_COMPONENTS)
    size = sum(p.stat().st_size for p in BUNDLED_MODEL.iterdir())
    assert size < MAX_BYTES


def test_bundled_model_card_and_metrics() -> None:
    card = (BUNDLED_MODEL / "README.md").read_text()
    assert "dpig train" in card and "dpig data synth" in card
    metrics = json.loads((BUNDLED_MODEL / "metrics.json").read_text())
    assert 0 < metrics["reconstruction"]["ssim_dpig"] <= 1
    assert metrics["sampling"]["fid_noise_vs_real"] > metrics["sampling"]["fid_samples_vs_real"]


@torch.inference_mode()
def test_bundled_model_samples_finite_images() -> None:
    model = from_pretrained(BUNDLED_MODEL)
    images = sample_people(model, 4, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, model.config.height, model.config.width)
    assert torch.isfinite(images).all()
    # people differ from one another: the samples are not one constant image
    assert (images[0] - images[1]).abs().mean() > 0.01
