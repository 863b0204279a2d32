from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpig_core.metrics.inception_score import (
    IS_WEIGHTS_FILE,
    IS_WEIGHTS_SHA256_PREFIX,
    InceptionV3ForIS,
    MetricUnavailable,
    inception_probs,
    inception_score,
    inception_score_from_probs,
    load_inception_for_is,
    tf1_resize_bilinear,
)
from dpig_core.weights import sha256_file

# pytorch-fid's fid_inception_v3(): torchvision Inception3(num_classes=1008, aux_logits=False).
# torchvision documents inception_v3 at 27,161,264 parameters (1000 classes, with AuxLogits);
# AuxLogits holds 98,560 + 2,459,136 + 769,000 = 3,326,696 of them, and 1008 classes add 8·2049.
PYTORCH_FID_PARAMS = 27_161_264 - 3_326_696 + 8 * 2049
# 94 BasicConv2d × (conv weight + 5 BatchNorm tensors) + fc weight and bias.
PYTORCH_FID_KEYS = 94 * 6 + 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InceptionV3ForIS]:
    torch.manual_seed(0)
    model = InceptionV3ForIS()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a faulty load shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("is") / IS_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path, model


def test_architecture_matches_pytorch_fid(saved: tuple[Path, InceptionV3ForIS]) -> None:
    path, original = saved
    model = load_inception_for_is(path, expected_sha256=sha256_file(path))
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == PYTORCH_FID_PARAMS == 23_850_960
    state = model.state_dict()
    assert len(state) == PYTORCH_FID_KEYS
    assert not any(k.startswith("AuxLogits") for k in state)
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.num_batches_tracked": (),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    for key, value in original.state_dict().items():
        assert torch.equal(state[key], value), key
    images = torch.randint(0, 256, (2, 3, 40, 24)).float()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 1008)
    assert torch.isfinite(logits).all()


def test_fc_bias_is_left_out_unless_asked(saved: tuple[Path, InceptionV3ForIS]) -> None:
    _, model = saved
    model.eval()
    images = torch.randint(0, 256, (1, 3, 32, 32)).float()
    with torch.no_grad():
        unbiased = model(images)
        model.use_fc_bias = True
        biased = model(images)
        model.use_fc_bias = False
    torch.testing.assert_close(biased - unbiased, model.fc.bias[None], atol=1e-5, rtol=0)


def test_strict_load_rejects_other_state_dicts(tmp_path: Path) -> None:
    path = tmp_path / "partial.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    with pytest.raises(MetricUnavailable, match="not pytorch-fid's Inception"):
        load_inception_for_is(path, expected_sha256=sha256_file(path))


def test_hash_gate(tmp_path: Path) -> None:
    with pytest.raises(MetricUnavailable, match=r"IS needs pt_inception-2015-12-05-6726825d\.pth"):
        load_inception_for_is(None)
    missing = tmp_path / IS_WEIGHTS_FILE
    with pytest.raises(MetricUnavailable, match="not found.*--is-weights FILE"):
        load_inception_for_is(missing)
    missing.write_bytes(b"not the weights")
    actual = sha256_file(missing)
    assert not actual.startswith(IS_WEIGHTS_SHA256_PREFIX)
    with pytest.raises(MetricUnavailable) as err:
        load_inception_for_is(missing)
    assert IS_WEIGHTS_FILE in str(err.value)
    assert actual in str(err.value)
    assert f"expected {IS_WEIGHTS_SHA256_PREFIX}" in str(err.value)
    with pytest.raises(MetricUnavailable, match="expected " + "0" * 64):
        load_inception_for_is(missing, expected_sha256="0" * 64)


def test_uniform_predictions_score_one() -> None:
    mean, std = inception_score_from_probs(torch.full((50, 1008), 1 / 1008), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_one_hot_predictions_over_k_classes_score_k(k: int) -> None:
    splits, per_class = 10, 3
    labels = torch.arange(splits * k * per_class) % k  # every split holds each class equally
    probs = torch.nn.functional.one_hot(labels, 1008).double()
    mean, std = inception_score_from_probs(probs, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_matches_openai_numpy_formula() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(53, 1008))
    preds = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for i in range(10):  # improved-GAN inception_score.py, verbatim maths
        part = preds[(i * preds.shape[0] // 10) : ((i + 1) * preds.shape[0] // 10), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, std = inception_score_from_probs(torch.from_numpy(preds), splits=10)
    assert mean == pytest.approx(float(np.mean(scores)), rel=1e-12)
    assert std == pytest.approx(float(np.std(scores)), rel=1e-9)


def test_needs_enough_images_for_the_splits() -> None:
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score_from_probs(torch.full((9, 1008), 1 / 1008), splits=10)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        inception_score_from_probs(torch.ones(1008), splits=1)


def test_inception_score_runs_the_network_in_order(saved: tuple[Path, InceptionV3ForIS]) -> None:
    _, model = saved
    model.eval()
    batches = [torch.randint(0, 256, (2, 3, 24, 16), dtype=torch.uint8) for _ in range(2)]
    probs = inception_probs(batches, model)
    assert probs.shape == (4, 1008)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4, dtype=torch.float64))
    with torch.no_grad():
        first = torch.softmax(model(batches[0]).double(), dim=1)
    torch.testing.assert_close(probs[:2], first)
    assert inception_score(batches, model, splits=2) == inception_score_from_probs(probs, 2)


def test_tf1_resize_has_no_half_pixel_offset() -> None:
    x = torch.tensor([[[[0.0, 10.0, 20.0]]]])
    out = tf1_resize_bilinear(x, (1, 6))
    # source column = destination · 3/6; the last ones clamp to the border pixel.
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 5.0, 10.0, 15.0, 20.0, 20.0]]]]))
    same = torch.rand(1, 3, 5, 7)
    torch.testing.assert_close(tf1_resize_bilinear(same, (5, 7)), same)
