from __future__ import annotations

import torch

from dpig_core.config import PRESETS
from dpig_core.generate import Z_STD, decode_pose, sample_people, sample_z
from dpig_core.models import DPIG

CFG = PRESETS["tiny"]


def _model() -> DPIG:
    torch.manual_seed(0)
    return DPIG(CFG).eval()


def test_sample_z_has_the_mapping_noise_scale() -> None:
    z = sample_z(_model(), "fg", 4000, torch.Generator().manual_seed(1))
    assert z.shape == (4000, CFG.fg_dim)
    assert abs(z.std().item() - Z_STD) < 0.01


def test_decoded_pose_is_inside_the_frame_and_floored() -> None:
    rcv = decode_pose(_model(), torch.randn(8, CFG.pose_dim))
    assert rcv.shape == (8, 18, 3)
    assert torch.equal(rcv, torch.floor(rcv))
    assert rcv[..., 0].max() <= CFG.height - 1 and rcv[..., 1].max() <= CFG.width - 1
    assert torch.all(rcv[rcv[..., 2] == 0] == 0)


@torch.inference_mode()
def test_sample_people_is_seeded() -> None:
    model = _model()
    a = sample_people(model, 3, torch.Generator().manual_seed(7))
    b = sample_people(model, 3, torch.Generator().manual_seed(7))
    assert a.shape == (3, 3, CFG.height, CFG.width)
    assert torch.equal(a, b)
