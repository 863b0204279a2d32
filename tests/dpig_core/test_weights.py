"""dpig_core.weights: the hashed, versioned weights folder.

A folder holds config.json, model.safetensors and manifest.json (each file's SHA-256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dpig_core.config import PRESETS
from dpig_core.models import DPIG
from dpig_core.weights import (
    ALL_COMPONENTS,
    CONFIG,
    INFERENCE_COMPONENTS,
    MANIFEST,
    WEIGHTS,
    WeightsError,
    from_pretrained,
    read_manifest,
    save_pretrained,
    verify,
    weights_sha256,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"]


@pytest.fixture
def model() -> DPIG:
    torch.manual_seed(0)
    return DPIG(TINY)


@pytest.fixture
def saved(model: DPIG, tmp_path: Path) -> Path:
    return save_pretrained(model, tmp_path / "tiny-weights", version="1.2.3")


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 16, generator=gen)
    mask = torch.zeros(2, 1, 32, 16)
    mask[..., 4:28, 4:12] = 1
    boxes = torch.tensor(
        [[0, 0, 16, 16], [8, 0, 24, 16], [16, 0, 31, 15], [4, 8, 20, 15], [4, 0, 20, 8],
         [16, 8, 31, 15], [16, 0, 31, 8]],
    ).float().expand(2, -1, -1)  # fmt: skip
    return image, mask, boxes, torch.ones(2, 7), torch.rand(2, 18, 32, 16, generator=gen).sign()


def outputs(model: DPIG) -> dict[str, torch.Tensor]:
    image, mask, boxes, vis, maps = inputs()
    with torch.no_grad():
        e = model.encoder(image, mask, boxes, vis)
        return {
            "embedding": e,
            "image": model.decoder(e, maps),
            "d": model.discriminator(image),
            "pose": model.pose_ae(torch.rand(2, 54, generator=torch.Generator().manual_seed(1))),
            "phi": model.mappings["fg"](e[:, :28]),
            "critic": model.critics["bg"](e[:, 28:]),
        }


def test_folder_layout_and_manifest(saved: Path, model: DPIG) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG, MANIFEST, WEIGHTS]
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest == read_manifest(saved)
    assert manifest["format"] == "dpig-weights/1"
    assert manifest["name"] == "tiny" and manifest["version"] == "1.2.3"
    assert manifest["components"] == list(ALL_COMPONENTS)
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(manifest["files"]) == {CONFIG, WEIGHTS}
    for name, digest in manifest["files"].items():
        assert digest == hashlib.sha256((saved / name).read_bytes()).hexdigest()
    assert weights_sha256(saved) == manifest["files"][WEIGHTS]
    assert json.loads((saved / CONFIG).read_text()) == TINY.to_dict()
    assert verify(saved) == manifest


def test_round_trip_gives_identical_tensors_and_outputs(saved: Path, model: DPIG) -> None:
    loaded = from_pretrained(saved)
    assert loaded.config == TINY
    assert not loaded.training and not any(m.training for m in loaded.modules())
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    model.eval()
    want, have = outputs(model), outputs(loaded)
    for k in want:
        assert torch.equal(want[k], have[k]), k


def test_load_with_dtype(saved: Path) -> None:
    loaded = from_pretrained(saved, dtype=torch.float64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}


def test_inference_components_round_trip(model: DPIG, tmp_path: Path) -> None:
    folder = save_pretrained(model, tmp_path / "infer", components=INFERENCE_COMPONENTS)
    assert set(INFERENCE_COMPONENTS) == {"encoder", "decoder", "pose_ae", "mappings"}
    with safe_open(str(folder / WEIGHTS), "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata() == {"format": "dpig-weights/1"}
    assert {k.split(".", 1)[0] for k in keys} == set(INFERENCE_COMPONENTS)
    manifest = read_manifest(folder)
    assert manifest["components"] == list(INFERENCE_COMPONENTS)
    kept = [m for name, m in model.named_children() if name in INFERENCE_COMPONENTS]
    assert manifest["parameters"] == sum(p.numel() for m in kept for p in m.parameters())
    loaded = from_pretrained(folder)
    ref, got = model.state_dict(), loaded.state_dict()
    for k in keys:
        assert torch.equal(ref[k], got[k]), k
    model.eval()
    want, have = outputs(model), outputs(loaded)
    for k in ("embedding", "image", "pose", "phi"):
        assert torch.equal(want[k], have[k]), k


def test_unknown_component(model: DPIG, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown component.*'generator'"):
        save_pretrained(model, tmp_path / "x", components=("encoder", "generator"))


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG])
def test_one_changed_byte_is_detected(saved: Path, name: str) -> None:
    path = saved / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"{name}: SHA-256 mismatch"):
        from_pretrained(saved)
    with pytest.raises(WeightsError, match=name):
        verify(saved)


def test_extra_files_are_hashed(model: DPIG, tmp_path: Path) -> None:
    folder = tmp_path / "with-card"
    folder.mkdir()
    (folder / "README.md").write_text("# tiny\n")
    save_pretrained(model, folder, extra_files=("README.md",), metadata={"steps": 3})
    manifest = read_manifest(folder)
    assert manifest["metadata"] == {"steps": 3}
    assert manifest["files"]["README.md"] == hashlib.sha256(b"# tiny\n").hexdigest()
    (folder / "README.md").write_text("# tampered\n")
    with pytest.raises(WeightsError, match="README.md: SHA-256 mismatch"):
        from_pretrained(folder)
    (folder / "README.md").unlink()
    with pytest.raises(WeightsError, match="README.md: listed in the manifest but missing"):
        verify(folder)


def test_missing_folder_says_local_only(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist.*local folder only"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(WeightsError, match="local folder only"):
        from_pretrained("org/dpig-market")  # looks like a hub id; nothing is downloaded


def test_missing_or_foreign_manifest(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    (saved / MANIFEST).write_text(json.dumps(manifest | {"format": "other/9"}))
    with pytest.raises(WeightsError, match="unsupported format 'other/9'"):
        from_pretrained(saved)
    (saved / MANIFEST).unlink()
    with pytest.raises(WeightsError, match="no manifest"):
        from_pretrained(saved)


def rewrite_config(folder: Path, **changes: object) -> None:
    """Replace config.json and re-hash it, so that only the config/weights mismatch remains."""
    (folder / CONFIG).write_text(TINY.with_changes(**changes).to_json() + "\n")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][CONFIG] = hashlib.sha256((folder / CONFIG).read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_config_with_more_layers_than_the_weights(saved: Path) -> None:
    rewrite_config(saved, mlp_blocks=3)
    with pytest.raises(WeightsError, match="does not match config 'tiny'.*missing"):
        from_pretrained(saved)


def test_config_with_fewer_layers_than_the_weights(saved: Path) -> None:
    rewrite_config(saved, mlp_blocks=1)
    with pytest.raises(WeightsError, match="does not match config 'tiny'.*unexpected"):
        from_pretrained(saved)


def test_config_with_other_widths_than_the_weights(saved: Path) -> None:
    # Same keys, different shapes: load_state_dict raises a size-mismatch RuntimeError; the
    # folder should still be reported as a WeightsError like the other mismatches.
    rewrite_config(saved, hidden=12)
    with pytest.raises(WeightsError, match="does not match config"):
        from_pretrained(saved)


def test_corrupt_manifest_is_a_weights_error(saved: Path) -> None:
    # A damaged manifest.json is a damaged weights folder like any other: WeightsError naming the
    # file, not a bare json.JSONDecodeError.
    path = saved / MANIFEST
    data = bytearray(path.read_bytes())
    data[0] = ord("[")
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=MANIFEST):
        from_pretrained(saved)
