"""Shared fixtures: small synthetic datasets written in the real Market-1501 format."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32×16 synthetic Market-1501 dataset (6 identities × 4 images), written once per session."""
    from dpig_core.data.synth import write_market_dataset

    root = tmp_path_factory.mktemp("tiny_market")
    write_market_dataset(root, identities=6, per_identity=4, height=32, width=16, seed=3,
                         progress=False)  # fmt: skip
    return root
