"""dpig_core.layers: TF-"SAME" convs, residual blocks, towers, crop_and_resize, TF initialisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpig_core.layers import (
    Down,
    ResBlock,
    SameConv2d,
    Tower,
    crop_and_resize,
    uniform_std_,
    xavier_,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# A 4×4 map whose value is its own index 4·y + x: bilinear sampling of it at (y, x) gives 4y + x.
RAMP = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)


def crop(features: torch.Tensor, box: list[float], size: int) -> torch.Tensor:
    """One box on a one-image map → [C, size, size]."""
    return crop_and_resize(features, torch.tensor([[box]]), size)[0, 0]


def tf_crop_and_resize(image: np.ndarray, box: list[float], size: int) -> np.ndarray:
    """Reference: TensorFlow's CropAndResize CPU kernel (bilinear, extrapolation 0), in float64.

    `box` is already normalised (y1, x1, y2, x2); image is [C, H, W].
    """
    _, h, w = image.shape
    y1, x1, y2, x2 = box
    out = np.zeros((image.shape[0], size, size))
    hs = (y2 - y1) * (h - 1) / (size - 1) if size > 1 else 0.0
    ws = (x2 - x1) * (w - 1) / (size - 1) if size > 1 else 0.0
    for i in range(size):
        in_y = y1 * (h - 1) + i * hs if size > 1 else 0.5 * (y1 + y2) * (h - 1)
        if in_y < 0 or in_y > h - 1:
            continue
        top, bottom = math.floor(in_y), math.ceil(in_y)
        y_lerp = in_y - top
        for j in range(size):
            in_x = x1 * (w - 1) + j * ws if size > 1 else 0.5 * (x1 + x2) * (w - 1)
            if in_x < 0 or in_x > w - 1:
                continue
            left, right = math.floor(in_x), math.ceil(in_x)
            x_lerp = in_x - left
            t = image[:, top, left] + (image[:, top, right] - image[:, top, left]) * x_lerp
            b = image[:, bottom, left] + (image[:, bottom, right] - image[:, bottom, left]) * x_lerp
            out[:, i, j] = t + (b - t) * y_lerp
    return out


# --------------------------------------------------------------------------------------------------
# crop_and_resize (§3.1 step 3, §11.13)


def test_crop_reads_rows_divided_by_h_not_h_minus_1() -> None:
    # Box [0, 0, 2, 2] on 4×4, size 3: y2n = 2/4 = 0.5 → rows 0, 0.5·3/2 = 0.75, 1.5 (same cols).
    out = crop(RAMP, [0, 0, 2, 2], 3)
    expect = torch.tensor([[0.0, 0.75, 1.5], [3.0, 3.75, 4.5], [6.0, 6.75, 7.5]])
    torch.testing.assert_close(out[0], expect, atol=1e-5, rtol=0)


def test_crop_non_square_map_normalises_each_axis_by_its_size() -> None:
    # 5×4 map (H=5, W=4) with value 4y + x. Box [0, 0, 2, 2], size 3:
    # rows: 2/5·4 = 1.6 → 0, 0.8, 1.6; cols: 2/4·3 = 1.5 → 0, 0.75, 1.5.
    fmap = torch.arange(20, dtype=torch.float32).view(1, 1, 5, 4)
    out = crop(fmap, [0, 0, 2, 2], 3)
    expect = torch.tensor([[0.0, 0.75, 1.5], [3.2, 3.95, 4.7], [6.4, 7.15, 7.9]])
    torch.testing.assert_close(out[0], expect, atol=1e-5, rtol=0)


def test_crop_bilinear_weights() -> None:
    # A delta at (1, 1). Samples at 0, 0.75, 1.5 on both axes: weight (1 − |y − 1|)(1 − |x − 1|)
    # → 0.75·0.75 = 0.5625, 0.75·0.5 = 0.375, 0.5·0.5 = 0.25; row/col 0 get weight 0.
    delta = torch.zeros(1, 1, 4, 4)
    delta[0, 0, 1, 1] = 1
    out = crop(delta, [0, 0, 2, 2], 3)
    expect = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5625, 0.375], [0.0, 0.375, 0.25]])
    torch.testing.assert_close(out[0], expect, atol=1e-6, rtol=0)
    # A quadratic (y² + x²) is not reproduced exactly by bilinear interpolation: at 0.75 the value
    # is 0.75·1 = 0.75 per axis, not 0.5625.
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    out = crop((yy**2 + xx**2)[None, None], [0, 0, 2, 2], 3)
    axis = torch.tensor([0.0, 0.75, 0.5 * 1 + 0.5 * 4])  # 1.5 → halfway between 1 and 4
    torch.testing.assert_close(out[0], axis[:, None] + axis[None, :], atol=1e-5, rtol=0)


def test_crop_reaching_the_bottom_right_edge() -> None:
    # Box [2, 2, 4, 4]: y1n = 0.5, y2n = 1 → rows 1.5, 2.25, 3.0 (the last row exactly, inside).
    out = crop(RAMP, [2, 2, 4, 4], 3)
    pos = torch.tensor([1.5, 2.25, 3.0])
    torch.testing.assert_close(out[0], 4 * pos[:, None] + pos[None, :], atol=1e-5, rtol=0)
    # The whole map [0, 0, 4, 4] at size 4 reads rows 0, 1, 2, 3: the map itself.
    torch.testing.assert_close(crop(RAMP, [0, 0, 4, 4], 4)[0], RAMP[0, 0], atol=1e-5, rtol=0)


def test_crop_beyond_the_image_reads_zero() -> None:
    # Box [0, 0, 5, 5]: y2n = 1.25 → rows 0, 1.875, 3.75; 3.75 > H−1 → 0 (extrapolation value).
    out = crop(RAMP, [0, 0, 5, 5], 3)[0]
    expect = torch.tensor([[0.0, 1.875, 0.0], [7.5, 9.375, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
    # A box left of the image: every column negative → all zero.
    assert crop(RAMP + 1, [0, -4, 2, -1], 3).abs().max() == 0


def test_crop_unit_box_of_missing_parts() -> None:
    # [0, 0, 1, 1] (missing part): y2n = 1/4 → rows 0, 0.375, 0.75.
    out = crop(RAMP, [0, 0, 1, 1], 3)
    pos = torch.tensor([0.0, 0.375, 0.75])
    torch.testing.assert_close(out[0], 4 * pos[:, None] + pos[None, :], atol=1e-5, rtol=0)


def test_crop_size_one_samples_the_centre() -> None:
    # 0.5·(y1n + y2n)·(H − 1): [0, 0, 2, 2] on 4×4 → 0.75, 0.75 → 4·0.75 + 0.75 = 3.75.
    assert crop(RAMP, [0, 0, 2, 2], 1).shape == (1, 1, 1)
    torch.testing.assert_close(crop(RAMP, [0, 0, 2, 2], 1)[0, 0, 0], torch.tensor(3.75))
    # [1, 0, 3, 2] on the 5×4 map: row 0.5·(0.2 + 0.6)·4 = 1.6, col 0.5·(0 + 0.5)·3 = 0.75.
    fmap = torch.arange(20, dtype=torch.float32).view(1, 1, 5, 4)
    torch.testing.assert_close(crop(fmap, [1, 0, 3, 2], 1)[0, 0, 0], torch.tensor(7.15))


def test_crop_matches_tf_reference_on_random_boxes() -> None:
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 3, 7, 5, generator=gen)
    boxes = torch.stack(
        [
            torch.tensor([[0, 0, 1, 1], [0, 0, 7, 5], [2, 1, 6, 4], [-2, -1, 9, 7], [3, 4, 3, 4]]),
            torch.tensor([[1, 1, 2, 3], [6, 4, 7, 5], [0, 2, 5, 3], [5, 0, 1, 5], [2, 2, 8, 6]]),
        ]
    ).float()
    for size in (1, 2, 3, 6):
        out = crop_and_resize(fmap, boxes, size)
        assert out.shape == (2, 5, 3, size, size)
        for b in range(2):
            for r in range(5):
                y1, x1, y2, x2 = boxes[b, r].tolist()
                ref = tf_crop_and_resize(
                    fmap[b].double().numpy(), [y1 / 7, x1 / 5, y2 / 7, x2 / 5], size
                )
                np.testing.assert_allclose(out[b, r].numpy(), ref, atol=2e-5, rtol=0)


def test_crop_boxes_are_per_image_and_channels_independent() -> None:
    fmap = torch.cat([RAMP, 100 + RAMP], dim=1).repeat(2, 1, 1, 1)  # [2, 2, 4, 4]
    fmap[1] *= -1
    boxes = torch.tensor([[[0, 0, 4, 4], [0, 0, 2, 2]], [[0, 0, 2, 2], [0, 0, 4, 4]]])
    out = crop_and_resize(fmap, boxes, 4)
    assert out.shape == (2, 2, 2, 4, 4)
    torch.testing.assert_close(out[0, 0, 1], 100 + RAMP[0, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, 1, 0], -RAMP[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 1], -out[1, 0], atol=1e-5, rtol=0)


def test_crop_gradients_flow_to_the_features() -> None:
    fmap = torch.zeros(1, 1, 4, 4, requires_grad=True)
    crop_and_resize(fmap, torch.tensor([[[0, 0, 2, 2]]]), 3).sum().backward()
    assert fmap.grad is not None
    # Samples 0, 0.75, 1.5 per axis spread weight 1 + 0.25 on pixel 0, 0.75 + 0.5 on 1, 0.5 on 2.
    axis = torch.tensor([1.25, 1.25, 0.5, 0.0])
    torch.testing.assert_close(fmap.grad[0, 0], axis[:, None] * axis[None, :], atol=1e-6, rtol=0)


def test_crop_float64() -> None:
    out = crop_and_resize(RAMP.double(), torch.tensor([[[0, 0, 2, 2]]]), 3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[0, 0, 0, 1, 1], torch.tensor(3.75, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# SameConv2d


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize(
    ("kernel", "stride", "h", "w"),
    [
        (3, 2, 7, 6),
        (3, 2, 8, 8),
        (5, 2, 8, 8),
        (5, 2, 9, 5),
        (5, 2, 1, 2),
        (3, 1, 5, 4),
        (1, 1, 3, 3),
    ],
)
def test_same_conv_matches_explicit_tf_padding(kernel: int, stride: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel, stride)
    x = torch.randn(2, 2, h, w)
    top, bottom = tf_same_pads(h, kernel, stride)
    left, right = tf_same_pads(w, kernel, stride)
    ref = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride)
    out = conv(x)
    assert out.shape == (2, 3, math.ceil(h / stride), math.ceil(w / stride))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_same_conv_stride2_puts_the_extra_pad_bottom_right() -> None:
    # 3×3 stride 2 on an even 4×4: total padding 1, all of it at the bottom/right. A kernel that
    # reads only its top-left tap returns x[2i − 0, 2j − 0] (no top/left padding).
    conv = SameConv2d(1, 1, 3, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1
        conv.bias.zero_()
    out = conv(RAMP)
    assert out[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    # Bottom-right tap: reads x[2i + 2, 2j + 2]; the last row/col fall into the padding → 0.
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 2, 2] = 1
    assert conv(RAMP)[0, 0].tolist() == [[10.0, 0.0], [0.0, 0.0]]
    # An odd 5×5 input pads 1 on each side: the top-left tap reads x[2i − 1, 2j − 1].
    fmap = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1
    assert conv(fmap)[0, 0].tolist() == [[0.0, 0.0, 0.0], [0.0, 6.0, 8.0], [0.0, 16.0, 18.0]]


def test_same_conv_stride1_keeps_size() -> None:
    conv = SameConv2d(3, 4, 3)
    x = torch.randn(1, 3, 5, 7)
    assert conv(x).shape == (1, 4, 5, 7)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


# --------------------------------------------------------------------------------------------------
# ResBlock, Down, Tower


def test_resblock_identity_when_second_conv_is_zero() -> None:
    block = ResBlock(3)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(block(x), x)


def test_resblock_exact_values_with_zero_padding() -> None:
    # conv1 = bias 1 only → ReLU → all ones; conv2 = all-ones 3×3 kernel over C = 2 channels, so the
    # residual is 2 · (number of in-image taps): 18 inside, 12 on an edge, 8 in a corner.
    block = ResBlock(2)
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv1.bias.fill_(1)
        block.conv2.weight.fill_(1)
        block.conv2.bias.zero_()
    x = torch.full((1, 2, 4, 4), 0.5)
    expect = 0.5 + torch.tensor(
        [
            [8.0, 12.0, 12.0, 8.0],
            [12.0, 18.0, 18.0, 12.0],
            [12.0, 18.0, 18.0, 12.0],
            [8.0, 12, 12, 8],
        ]
    )
    out = block(x)
    torch.testing.assert_close(out[0, 0], expect)
    torch.testing.assert_close(out[0, 1], expect)


def test_resblock_relu_after_second_conv() -> None:
    # conv2 bias −1 with zero weights: ReLU(−1) = 0, so the output is the input (not input − 1).
    block = ResBlock(2)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.fill_(-1)
    x = torch.randn(1, 2, 3, 3)
    assert torch.equal(block(x), x)


def test_down_halves_with_ceil_and_relu() -> None:
    torch.manual_seed(0)
    down = Down(4, 6)
    out = down(torch.randn(2, 4, 9, 6))
    assert out.shape == (2, 6, 5, 3)
    assert out.min() >= 0


def test_tower_channels_shapes_and_skips() -> None:
    torch.manual_seed(0)
    tower = Tower(4, 3)
    assert [b.conv1.in_channels for b in tower.blocks] == [4, 8, 12]  # n, 2n, 3n
    assert [(d.conv.in_channels, d.conv.out_channels) for d in tower.downs] == [(4, 8), (8, 12)]
    assert [d.conv.stride for d in tower.downs] == [(2, 2), (2, 2)]
    assert tower.out_channels == 12
    x = torch.randn(2, 4, 16, 8)
    out, skips = tower.forward_skips(x)
    assert out.shape == (2, 12, 4, 2)
    assert [s.shape for s in skips] == [(2, 4, 16, 8), (2, 8, 8, 4), (2, 12, 4, 2)]
    assert torch.equal(skips[0], tower.blocks[0](x))
    assert torch.equal(skips[1], tower.blocks[1](tower.downs[0](skips[0])))
    assert torch.equal(skips[-1], out)
    assert torch.equal(tower(x), out)


def test_tower_depth_one_has_no_down() -> None:
    tower = Tower(4, 1)
    assert len(tower.downs) == 0 and tower.out_channels == 4
    assert tower(torch.randn(1, 4, 6, 6)).shape == (1, 4, 6, 6)


def test_market_tower_channel_pattern() -> None:
    with torch.device("meta"):
        tower = Tower(128, 5)
        out = tower(torch.zeros(1, 128, 48, 48))
    assert [b.conv1.out_channels for b in tower.blocks] == [128, 256, 384, 512, 640]
    assert out.shape == (1, 640, 3, 3)  # 48 → 24 → 12 → 6 → 3 (§3.1)


# --------------------------------------------------------------------------------------------------
# Initialisers


def test_xavier_init_bounds_and_zero_bias() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Linear(300, 200))
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.constant_(m.bias, 3.0)
    xavier_(net)
    conv, lin = net[0], net[1]
    conv_bound = math.sqrt(6 / (16 * 9 + 32 * 9))
    lin_bound = math.sqrt(6 / (300 + 200))
    assert conv.weight.abs().max() <= conv_bound and conv.weight.abs().max() > 0.95 * conv_bound
    assert lin.weight.abs().max() <= lin_bound and lin.weight.abs().max() > 0.95 * lin_bound
    assert conv.bias.abs().max() == 0 and lin.bias.abs().max() == 0


def test_uniform_std_bounds() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(400, 300)
    uniform_std_(lin, 0.02)
    bound = 0.02 * math.sqrt(3)
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.99 * bound
    assert abs(lin.weight.std().item() - 0.02) < 5e-4
    assert lin.bias.abs().max() == 0
