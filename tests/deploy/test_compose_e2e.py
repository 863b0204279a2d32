"""Offline checks of what `make compose-e2e` runs (docs/operations.md, "Local images without a
registry"): the compose override changes only image sources, networks and what a CPU-only,
internal-only run cannot have; the Dockerfiles keep their production defaults; the stand-in
Dockerfiles lint; and the output digest the run compares catches a wrong byte."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))

from e2e_digest import digest  # noqa: E402

OVERRIDE = ROOT / "docker" / "compose.e2e.yml"
STANDINS = sorted((ROOT / "docker" / "standins").glob("*/Dockerfile"))


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags (`!reset`, `!override`) kept as ("tag", value)."""


def _tagged(loader: yaml.SafeLoader, tag: str, node: yaml.Node) -> tuple[str, Any]:
    if isinstance(node, yaml.MappingNode):
        return tag, loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return tag, loader.construct_sequence(node)
    return tag, loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_multi_constructor("!", _tagged)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506
    return data


def test_override_swaps_only_images_and_networks() -> None:
    override, base = _load(OVERRIDE), _load(ROOT / "docker-compose.yml")
    assert set(override) == {"networks", "services"}
    assert override["networks"] == {"default": {"internal": True}}
    assert set(override["services"]) <= set(base["services"])
    for name, service in override["services"].items():
        for key, value in service.items():
            if key == "image":
                assert value.startswith("dpig-standin/"), (name, value)
                assert base["services"][name]["image"] != value
            elif key == "ports":  # an internal network cannot publish to the host
                assert value == ("reset", []), name
            elif key == "deploy":  # no GPU: the test images carry the CPU torch wheel
                assert (name, value) == ("worker", ("reset", {}))
            else:
                raise AssertionError(f"the override changes {name}.{key}")
    # every published port of the stack is dropped, so no service needs the host
    published = {n for n, s in base["services"].items() if "ports" in s and "profiles" not in s}
    assert published == {n for n, s in override["services"].items() if "ports" in s}


def test_grafana_is_left_out_unless_its_profile_is_on() -> None:
    base = _load(ROOT / "docker-compose.yml")
    profiled = {n: s["profiles"] for n, s in base["services"].items() if "profiles" in s}
    assert profiled == {"grafana": ["grafana"]}
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^COMPOSE_PROFILES=grafana$", example, flags=re.M)


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfiles_default_to_the_upstream_base_and_the_indexes(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, flags=re.M))
    base = args.get("CUDA_IMAGE") or args["PYTHON_IMAGE"]
    assert base.startswith("nvidia/cuda:" if "CUDA_IMAGE" in args else "python:3.11"), base
    assert args["WHEELHOUSE_ONLY"] == "0", "pip reaches the indexes unless asked not to"
    assert "PIP_NO_INDEX=${WHEELHOUSE_ONLY}" in text
    assert "COPY docker/wheelhouse /wheelhouse" in text
    assert "!docker/wheelhouse/" in (ROOT / ".dockerignore").read_text().splitlines()


@pytest.mark.parametrize("dockerfile", STANDINS, ids=lambda p: p.parent.name)
def test_standin_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert dockerfile.read_text().count("FROM local/") == 1, "built from a local Debian base"


def _job_folder(tmp_path: Path, images: dict[str, bytes], manifest: dict[str, str]) -> Path:
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for key, data in images.items():
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(shard.getvalue())
    rows = [{"key": k, "item": i, "status": "ok", "sha256": h} for i, (k, h) in
            enumerate(manifest.items())]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    return tmp_path


def test_digest_hashes_the_shard_bytes(tmp_path: Path) -> None:
    images = {"000000": b"\x89PNG one", "000001": b"\x89PNG two"}
    hashes = {k: hashlib.sha256(v).hexdigest() for k, v in images.items()}
    assert digest(_job_folder(tmp_path, images, hashes)) == hashes


def test_digest_fails_when_the_manifest_and_the_shards_disagree(tmp_path: Path) -> None:
    images = {"000000": b"\x89PNG one", "000001": b"\x89PNG two"}
    wrong = {k: hashlib.sha256(v + b"!").hexdigest() for k, v in images.items()}
    with pytest.raises(SystemExit, match="disagree"):
        digest(_job_folder(tmp_path, images, wrong))
