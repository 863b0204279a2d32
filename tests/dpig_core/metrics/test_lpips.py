from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpig_core.metrics.lpips import (
    ALEXNET_FILE,
    ALEXNET_SHA256_PREFIX,
    LPIPS_HEADS_SHA256,
    LPIPSAlex,
    MetricUnavailable,
    alexnet_features,
    load_lpips,
    lpips,
)
from dpig_core.weights import sha256_file

Files = tuple[Path, Path]


def _save_weights(directory: Path, seed: int = 0) -> Files:
    torch.manual_seed(seed)
    features = alexnet_features()
    for m in features:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.normal_(m.bias, std=0.05)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # the real file's classifier is ignored
    alex = directory / ALEXNET_FILE
    torch.save(state, alex)
    heads = directory / "alex.pth"
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1
                for k, c in enumerate((64, 192, 384, 256, 256))}, heads)  # fmt: skip
    return alex, heads


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return _save_weights(tmp_path_factory.mktemp("lpips"))


@pytest.fixture(scope="module")
def model(files: Files) -> LPIPSAlex:
    alex, heads = files
    return load_lpips(
        alex, heads, alexnet_sha256=sha256_file(alex), heads_sha256=sha256_file(heads)
    )


def _images(seed: int, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 128, 64, generator=g) * 2 - 1


def test_loads_strictly_with_real_hashes(files: Files, model: LPIPSAlex) -> None:
    alex, heads = files
    assert not model.training
    saved = torch.load(alex, weights_only=True)
    for k, v in model.features.state_dict().items():
        assert torch.equal(v, saved[f"features.{k}"]), k
    saved_heads = torch.load(heads, weights_only=True)
    assert set(model.heads.state_dict()) == set(saved_heads)
    assert model.shift.flatten().tolist() == pytest.approx([-0.030, -0.088, -0.188])
    assert model.scale.flatten().tolist() == pytest.approx([0.458, 0.448, 0.450])


def test_zero_for_identical_images(model: LPIPSAlex) -> None:
    x = _images(0)
    d = lpips(x, x.clone(), model)
    assert d.shape == (3,)
    assert torch.equal(d, torch.zeros(3))


def test_symmetric_and_positive(model: LPIPSAlex) -> None:
    a, b = _images(1), _images(2)
    ab, ba = lpips(a, b, model), lpips(b, a, model)
    torch.testing.assert_close(ab, ba)
    assert (ab > 0).all()
    closer = (a + 0.05 * (b - a)).clamp(-1, 1)
    assert (lpips(a, closer, model) < ab).all()


def test_linear_in_the_heads(files: Files, model: LPIPSAlex) -> None:
    a, b = _images(3, 2), _images(4, 2)
    base = lpips(a, b, model)
    doubled = LPIPSAlex()
    doubled.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in doubled.heads.parameters():
            p.mul_(2)
    torch.testing.assert_close(lpips(a, b, doubled.eval()), 2 * base)


def test_gate_missing_files(files: Files) -> None:
    alex, heads = files
    with pytest.raises(MetricUnavailable, match="LPIPS needs torchvision's alexnet-owt-7be5be79"):
        load_lpips(None, heads)
    with pytest.raises(MetricUnavailable, match="not found"):
        load_lpips(alex, heads.with_name("nope.pth"), alexnet_sha256=sha256_file(alex))


def test_gate_wrong_hashes(files: Files) -> None:
    alex, heads = files
    assert not sha256_file(alex).startswith(ALEXNET_SHA256_PREFIX)
    with pytest.raises(MetricUnavailable) as err:
        load_lpips(alex, heads, heads_sha256=sha256_file(heads))
    assert ALEXNET_FILE in str(err.value) and f"expected {ALEXNET_SHA256_PREFIX}" in str(err.value)
    assert sha256_file(alex) in str(err.value)
    with pytest.raises(MetricUnavailable, match=f"expected {LPIPS_HEADS_SHA256}"):
        load_lpips(alex, heads, alexnet_sha256=sha256_file(alex))


def test_gate_wrong_tensors(tmp_path: Path) -> None:
    alex, heads = _save_weights(tmp_path)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, heads)
    with pytest.raises(MetricUnavailable, match="do not fit"):
        load_lpips(alex, heads, alexnet_sha256=sha256_file(alex), heads_sha256=sha256_file(heads))
    torch.save({"backbone.0.weight": torch.zeros(1)}, alex)
    with pytest.raises(MetricUnavailable, match="unexpected keys"):
        load_lpips(alex, heads, alexnet_sha256=sha256_file(alex), heads_sha256=sha256_file(heads))
