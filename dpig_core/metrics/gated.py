"""Metrics whose networks need third-party weights that are neither bundled nor downloadable here
(Inception Score, LPIPS). They run only when the caller supplies the files and the files hash to
the published value; otherwise they raise `MetricUnavailable` with what to pass."""

from __future__ import annotations

from pathlib import Path

import torch

from dpig_core.weights import sha256_file


class MetricUnavailable(RuntimeError):
    """A gated metric cannot run: its weights file is missing or is not the expected file."""


def check_weights_file(
    path: str | Path | None,
    *,
    what: str,
    hint: str,
    sha256_prefix: str | None = None,
    expected_sha256: str | None = None,
) -> Path:
    """Return `path` once it exists and its SHA-256 matches.

    `expected_sha256` (a full 64-hex digest) wins over `sha256_prefix` (torch-hub style: a file
    named `name-<8 hex>.pth` carries the first 8 hex digits of its own SHA-256). One of the two is
    required. `what` names the metric and `hint` says how to supply the file; both go into the
    error message.
    """
    if expected_sha256 is None and sha256_prefix is None:
        raise ValueError("check_weights_file needs expected_sha256 or sha256_prefix")
    if path is None:
        raise MetricUnavailable(f"{what}: {hint}")
    file = Path(path)
    if not file.is_file():
        raise MetricUnavailable(f"{what}: {file} not found. {hint}")
    actual = sha256_file(file)
    if expected_sha256 is not None:
        expected, ok = expected_sha256.lower(), actual == expected_sha256.lower()
    else:
        assert sha256_prefix is not None
        expected, ok = f"{sha256_prefix.lower()}…", actual.startswith(sha256_prefix.lower())
    if not ok:
        raise MetricUnavailable(f"{what}: {file} has SHA-256 {actual}, expected {expected}. {hint}")
    return file


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `torch.save`d state dict, loaded on the CPU without unpickling code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricUnavailable(f"{path}: not a state dict of tensors")
    return state


__all__ = ["MetricUnavailable", "check_weights_file", "load_state_dict_file"]
