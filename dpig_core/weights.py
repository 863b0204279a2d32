"""Weights as a named, hashed, versioned artefact: a folder with `config.json`, `model.safetensors`
and `manifest.json` (each file's SHA-256). Loading is from a local folder only."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpig_core.config import DPIGConfig
from dpig_core.models import DPIG

MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "dpig-weights/1"
ALL_COMPONENTS = ("encoder", "decoder", "discriminator", "pose_ae", "mappings", "critics")
INFERENCE_COMPONENTS = ("encoder", "decoder", "pose_ae", "mappings")


class WeightsError(RuntimeError):
    """A weights folder that is missing, incomplete, or does not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_pretrained(
    model: DPIG,
    directory: str | Path,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    components: tuple[str, ...] = ALL_COMPONENTS,
    extra_files: tuple[str, ...] = (),
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the model; `components` picks the sub-networks kept (INFERENCE_COMPONENTS drops the
    discriminator and critics). `extra_files` already in the folder (a model card, metrics) are
    hashed into the manifest too."""
    unknown = set(components) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {ALL_COMPONENTS}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(model.config.to_json() + "\n")
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if k.split(".", 1)[0] in components
    }
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    files = {f: sha256_file(out / f) for f in (CONFIG, WEIGHTS, *extra_files)}
    manifest = {
        "format": FORMAT,
        "name": name or model.config.name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "components": list(components),
        "parameters": sum(v.numel() for v in state.values()),
        "files": files,
        **({"metadata": metadata} if metadata else {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def read_manifest(directory: str | Path) -> dict[str, Any]:
    folder = Path(directory)
    if not folder.is_dir():
        raise WeightsError(
            f"weights folder {str(folder)!r} does not exist (dpig loads weights from a local "
            "folder only; nothing is downloaded)"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise WeightsError(f"{path}: no manifest; was this folder written by save_pretrained?")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise WeightsError(f"{path}: manifest has no 'files' table")
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{path}: unsupported format {manifest.get('format')!r}, want {FORMAT}")
    return manifest


def verify(directory: str | Path) -> dict[str, Any]:
    """Check every file of the manifest against its SHA-256; return the manifest."""
    folder = Path(directory)
    manifest = read_manifest(folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise WeightsError(
                f"{path}: SHA-256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…); the "
                "file is corrupt or was modified after it was saved"
            )
    return manifest


def from_pretrained(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> DPIG:
    """Load a verified weights folder; the model is returned in eval mode on `device`."""
    folder = Path(directory)
    manifest = verify(folder)
    try:
        config = DPIGConfig.load(folder / CONFIG)
    except ValueError as exc:
        raise WeightsError(f"{folder / CONFIG}: {exc}") from None
    model = DPIG(config)
    state = load_file(str(folder / WEIGHTS))
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise WeightsError(
            f"{folder / WEIGHTS}: does not match config {config.name!r}: {wrong[0]} has shape "
            f"{tuple(state[wrong[0]].shape)}, the config builds {tuple(expected[wrong[0]].shape)}"
        )
    result = model.load_state_dict(state, strict=False)
    components = set(manifest["components"])
    missing = [k for k in result.missing_keys if k.split(".", 1)[0] in components]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{folder / WEIGHTS}: does not match config {config.name!r} (missing "
            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    model.to(device=device, dtype=dtype)
    return model.eval()


def weights_sha256(directory: str | Path) -> str:
    """The hash that names these weights (of `model.safetensors`), as recorded in the manifest."""
    digest: str = read_manifest(directory)["files"][WEIGHTS]
    return digest
