"""dpig_core.models.decoder: the U-Net decoder and its fast input conv (§3.2–§3.3, §9 note)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpig_core.config import PRESETS
from dpig_core.models.decoder import UNetDecoder, constant_input_conv
from dpig_core.pose import pose_maps

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"]


def decoder_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(batch, TINY.embedding_dim, generator=gen) * 3
    rcv = torch.zeros(batch, 18, 3)
    rcv[:, :, 0] = torch.randint(0, TINY.height, (batch, 18), generator=gen).float()
    rcv[:, :, 1] = torch.randint(0, TINY.width, (batch, 18), generator=gen).float()
    rcv[:, :, 2] = (torch.rand(batch, 18, generator=gen) > 0.3).float()
    rcv[:, 0] = torch.tensor([0.0, 0.0, 1.0])  # a keypoint on the corner: the border matters
    return embedding, pose_maps(rcv, TINY.height, TINY.width, TINY.pose_radius)


def both_paths(dec: UNetDecoder, fn: str, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dec.fast_input_conv = False
    plain = getattr(dec, fn)(*args)
    dec.fast_input_conv = True
    fast = getattr(dec, fn)(*args)
    return plain, fast


# --------------------------------------------------------------------------------------------------
# constant_input_conv


def test_constant_input_conv_hand_values() -> None:
    # All-ones 3×3 kernel on a constant 1 over a 3×3 image: the number of in-image taps.
    out = constant_input_conv(torch.ones(1, 1, 3, 3), torch.ones(1, 1), 3, 3)
    assert out[0, 0].tolist() == [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
    # Two images, two channels with values 2 and −1, weights 1 and 10: per tap 2 − 10 = −8.
    weight = torch.ones(1, 2, 3, 3)
    weight[:, 1] = 10
    out = constant_input_conv(weight, torch.tensor([[2.0, -1.0], [0.0, 1.0]]), 1, 2)
    # 1×2 image: only the centre kernel row is inside, and 2 of its 3 columns → 2 taps per pixel.
    assert out.tolist() == [[[[-16.0, -16.0]]], [[[20.0, 20.0]]]]


@pytest.mark.parametrize(("h", "w", "k"), [(5, 7, 3), (1, 1, 3), (2, 3, 3), (9, 4, 3), (7, 5, 5)])
def test_constant_input_conv_equals_conv_on_tiled_input(h: int, w: int, k: int) -> None:
    gen = torch.Generator().manual_seed(h * 100 + w)
    weight = torch.randn(6, 4, k, k, generator=gen, dtype=torch.float64)
    values = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    tiled = values[:, :, None, None].expand(-1, -1, h, w)
    ref = F.conv2d(tiled, weight, padding=k // 2)
    out = constant_input_conv(weight, values, h, w)
    assert out.shape == (3, 6, h, w) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------
# The fast input conv equals the plain conv


def test_fast_input_conv_is_the_default() -> None:
    assert UNetDecoder(TINY).fast_input_conv is True


def test_input_conv_fast_equals_plain_float32() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY)
    embedding, maps = decoder_inputs()
    plain, fast = both_paths(dec, "input_conv", embedding, maps)
    assert plain.shape == fast.shape == (2, TINY.hidden, TINY.height, TINY.width)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)  # fp32 sums of ~100 terms
    diff = fast - plain
    for border in (diff[..., 0, :], diff[..., -1, :], diff[..., :, 0], diff[..., :, -1]):
        assert border.abs().max() < 1e-5
    # The border really differs from the interior (zero padding is kept).
    assert (plain[..., 0, 5] - plain[..., 5, 5]).abs().max() > 1e-2


def test_input_conv_plain_is_the_conv_of_the_concatenation() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY)
    dec.fast_input_conv = False
    embedding, maps = decoder_inputs()
    tiled = embedding[:, :, None, None].expand(-1, -1, TINY.height, TINY.width)
    x = torch.cat([tiled, maps], dim=1)
    assert x.shape[1] == TINY.embedding_dim + 18
    ref = F.conv2d(x, dec.conv_in.weight, dec.conv_in.bias, padding=1)
    torch.testing.assert_close(dec.input_conv(embedding, maps), ref, atol=1e-6, rtol=0)


def test_decoder_fast_equals_plain_float32() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY)
    embedding, maps = decoder_inputs()
    plain, fast = both_paths(dec, "forward", embedding, maps)
    assert fast.shape == (2, 3, TINY.height, TINY.width)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)  # fp32 sums of ~100 terms


def test_decoder_fast_equals_plain_float64() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY).double()
    embedding, maps = decoder_inputs()
    embedding = embedding.double()
    plain, fast = both_paths(dec, "input_conv", embedding, maps)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=0)
    plain, fast = both_paths(dec, "forward", embedding, maps)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=0)


def test_fast_path_gradients_match() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY).double()
    embedding, maps = decoder_inputs()
    grads = []
    for fast in (False, True):
        dec.zero_grad()
        dec.fast_input_conv = fast
        e = embedding.double().requires_grad_()
        dec(e, maps).square().mean().backward()
        grads.append((e.grad, dec.conv_in.weight.grad.clone(), dec.conv_in.bias.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# Structure and behaviour


def test_output_is_linear_no_tanh() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY)
    with torch.no_grad():
        dec.conv_out.weight.zero_()
        dec.conv_out.bias.copy_(torch.tensor([5.0, -7.0, 0.5]))
    out = dec(*decoder_inputs())
    assert out[:, 0].eq(5).all() and out[:, 1].eq(-7).all() and out[:, 2].eq(0.5).all()


def test_skips_carry_information_past_the_bottleneck() -> None:
    # With the FC bottleneck zeroed the output still depends on the input, through the skips.
    torch.manual_seed(0)
    dec = UNetDecoder(TINY)
    with torch.no_grad():
        dec.fc_up.weight.zero_()
    embedding, maps = decoder_inputs()
    a, b = dec(embedding, maps), dec(embedding + 1, maps)
    assert (a - b).abs().max() > 1e-4


def test_tiny_channel_pattern() -> None:
    dec = UNetDecoder(TINY)  # n = 8, depth 3
    assert dec.conv_in.in_channels == 36 + 18 and dec.conv_in.out_channels == 8
    assert [b.conv1.in_channels for b in dec.down.blocks] == [8, 16, 24]
    assert dec.bottom == (8, 4)
    assert dec.fc_down.in_features == 8 * 4 * 24 and dec.fc_up.out_features == 8 * 4 * 8
    assert [b.conv1.in_channels for b in dec.up_blocks] == [8 + 24, 16 + 16, 8 + 8]
    assert [c.out_channels for c in dec.up_convs] == [16, 8]
    assert dec.conv_out.in_channels == 16 and dec.conv_out.out_channels == 3


def test_market_channel_pattern_matches_spec_table() -> None:
    with torch.device("meta"):
        dec = UNetDecoder(PRESETS["market"])
    assert dec.conv_in.in_channels == 370
    assert [b.conv1.in_channels for b in dec.down.blocks] == [128, 256, 384, 512, 640]
    assert dec.fc_down.in_features == 20480 and dec.fc_down.out_features == 64
    assert dec.fc_up.out_features == 8 * 4 * 128
    assert [b.conv1.in_channels for b in dec.up_blocks] == [768, 1024, 768, 512, 256]
    assert [c.out_channels for c in dec.up_convs] == [512, 384, 256, 128]
    assert [c.kernel_size for c in dec.up_convs] == [(1, 1)] * 4
    assert dec.conv_out.in_channels == 256 and dec.conv_out.out_channels == 3


def test_deepfashion_bottleneck() -> None:
    with torch.device("meta"):
        dec = UNetDecoder(PRESETS["deepfashion"])
    assert dec.conv_in.in_channels == 242 and dec.bottom == (16, 16)
    assert dec.fc_down.in_features == 163840 and dec.fc_up.out_features == 32768


@pytest.mark.parametrize(
    ("preset", "shape"), [("market", (2, 3, 128, 64)), ("deepfashion", (2, 3, 256, 256))]
)
def test_full_presets_on_meta(preset: str, shape: tuple[int, ...]) -> None:
    config = PRESETS[preset]
    with torch.device("meta"):
        dec = UNetDecoder(config)
        embedding = torch.zeros(2, config.embedding_dim)
        maps = torch.zeros(2, 18, config.height, config.width)
        for fast in (True, False):
            dec.fast_input_conv = fast
            assert dec(embedding, maps).shape == shape


def test_determinism() -> None:
    torch.manual_seed(3)
    a = UNetDecoder(TINY)
    torch.manual_seed(3)
    b = UNetDecoder(TINY)
    x = decoder_inputs()
    out = a(*x)
    assert torch.equal(out, b(*x))
    assert torch.equal(out, a(*x))


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY)
    embedding, maps = decoder_inputs()
    embedding.requires_grad_()
    dec(embedding, maps).square().mean().backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------
# early_up_conv: the 1×1 conv + ReLU before the nearest ×2 upsampling instead of after it


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_early_up_conv_gives_the_same_images(channels_last: bool, batch: int) -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY).eval()
    if channels_last:
        dec = dec.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    embedding, maps = decoder_inputs(batch)
    with torch.inference_mode():
        dec.early_up_conv = False
        reference = dec(embedding, maps)
        dec.early_up_conv = True
        early = dec(embedding, maps)
    assert torch.equal(early, reference)


def test_early_up_conv_gradients_match() -> None:
    torch.manual_seed(0)
    dec = UNetDecoder(TINY)
    embedding, maps = decoder_inputs(2)
    grads = []
    for early in (False, True):
        dec.zero_grad()
        dec.early_up_conv = early
        dec(embedding, maps).square().mean().backward()
        grads.append([p.grad.clone() for p in dec.up_convs.parameters() if p.grad is not None])
    for reference, early_grad in zip(*grads, strict=True):
        torch.testing.assert_close(early_grad, reference)
