from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dpig_core.config import PRESETS
from dpig_core.data.readers import read_dataset
from dpig_core.models import DPIG
from dpig_core.pipeline import DPIGPipeline, Factors, item_noise, item_seed, slerp

CFG = PRESETS["tiny"]
BUNDLED = Path(__file__).resolve().parents[2] / "models" / "dpig-market-small-synth"

pytestmark = pytest.mark.usefixtures("single_thread")


def _pipe(**options: object) -> DPIGPipeline:
    torch.manual_seed(0)
    options = {"batch_size": 4, **options}
    return DPIGPipeline(DPIG(CFG), **options)  # type: ignore[arg-type]


def _people(pipe: DPIGPipeline, root: Path, count: int) -> Factors:
    records = read_dataset(root).records[:count]
    images, rcv = pipe.load_people([(r.path, r.rcv) for r in records])
    return pipe.encode(images, rcv)


def test_item_seeds_differ_between_items_seeds_and_streams() -> None:
    seeds = {item_seed(s, i, f) for s in (0, 1) for i in range(50) for f in ("fg", "bg", "pose")}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)
    assert item_seed(7, 3, "fg") == item_seed(7, 3, "fg")


def test_item_noise_does_not_depend_on_its_neighbours() -> None:
    alone = item_noise(11, [5], "bg", 16)
    among = item_noise(11, [9, 5, 0], "bg", 16)
    assert torch.equal(alone[0], among[1])
    assert abs(item_noise(0, list(range(500)), "fg", 64).std().item() - 0.2) < 0.01


def test_an_item_gives_the_same_pixels_alone_or_in_any_batch() -> None:
    pipe = _pipe()
    everything = pipe.sample(list(range(11)), seed=3)
    for subset in ([4], [10, 0, 7], list(range(2, 9))):
        assert torch.equal(pipe.sample(subset, seed=3), everything[subset])
    assert not torch.equal(pipe.sample([4], seed=4), everything[[4]])


def test_transfer_encodes_each_source_once_for_all_its_poses(tiny_market: Path) -> None:
    pipe = _pipe()
    calls = {"encoder": 0, "decoder": 0}

    def count(name: str):  # type: ignore[no-untyped-def]
        def hook(*_: object) -> None:
            calls[name] += 1

        return hook

    pipe.model.encoder.register_forward_hook(count("encoder"))
    pipe.model.decoder.register_forward_hook(count("decoder"))
    sources = _people(pipe, tiny_market, 3)
    poses = sources.rcv[[0, 1, 2, 0, 1]]
    grid = pipe.transfer(sources, poses)
    assert grid.shape == (3, 5, 3, CFG.height, CFG.width)
    assert calls == {"encoder": 1, "decoder": math.ceil(15 / pipe.batch_size)}
    pairs = pipe.transfer(sources, poses, pairs=[(2, 4), (0, 1)])
    assert torch.equal(pairs[0], grid[2, 4]) and torch.equal(pairs[1], grid[0, 1])
    with pytest.raises(IndexError, match="outside 3 sources"):
        pipe.transfer(sources, poses, pairs=[(3, 0)])


def test_transfer_keeps_the_source_appearance_and_takes_the_target_pose(tiny_market: Path) -> None:
    pipe = _pipe()
    sources = _people(pipe, tiny_market, 2)
    grid = pipe.transfer(sources, sources.rcv)
    # the diagonal is each source in its own pose
    own = pipe.render(sources)
    assert torch.equal(grid[0, 0], own[0]) and torch.equal(grid[1, 1], own[1])


def test_virtual_market_shares_one_foreground_per_identity() -> None:
    pipe = _pipe()
    f = pipe.sample_factors(list(range(6)), seed=1, per_identity=3)
    assert torch.equal(f.fg[0], f.fg[2]) and torch.equal(f.fg[3], f.fg[5])
    assert not torch.equal(f.fg[2], f.fg[3])
    assert f.bg is not None and not torch.equal(f.bg[0], f.bg[1])
    assert not torch.equal(f.rcv[0], f.rcv[1])


def test_a_sampled_pose_decodes_phi_pose_of_the_items_noise() -> None:
    pipe = _pipe()
    f = pipe.sample_factors([2, 3], seed=9)
    z = item_noise(9, [2, 3], "pose", CFG.pose_dim)
    code = pipe.map_noise("pose", z)
    assert f.pose is not None and torch.equal(f.pose, code)
    assert torch.equal(f.rcv, pipe.decode_poses(code))


def test_fixed_factors_come_from_the_reference_person(tiny_market: Path) -> None:
    pipe = _pipe()
    ref = _people(pipe, tiny_market, 1)
    f = pipe.sample_factors(list(range(5)), seed=2, fixed={"fg": ref, "pose": ref})
    assert torch.equal(f.fg, ref.fg.expand(5, -1))
    assert torch.equal(f.rcv, ref.rcv.expand(5, -1, -1))
    assert f.bg is not None and not torch.equal(f.bg[0], f.bg[1])
    with pytest.raises(ValueError, match="unknown factors"):
        pipe.sample_factors([0], seed=2, fixed={"hair": ref})


def test_swap_takes_each_factor_from_its_own_person(tiny_market: Path) -> None:
    pipe = _pipe()
    people = _people(pipe, tiny_market, 3)
    a, b, c = (people.select([i]) for i in range(3))
    swapped = pipe.swap(a, b, c)
    expected = Factors(a.fg, b.bg, c.rcv)
    assert torch.equal(swapped, pipe.render(expected))
    assert not torch.equal(swapped, pipe.swap(a, a, c))


def test_linear_and_slerp_interpolation_start_and_end_at_the_two_people(tiny_market: Path) -> None:
    pipe = _pipe()
    people = _people(pipe, tiny_market, 2)
    a, b = people.select([0]), people.select([1])
    for method in ("linear", "slerp"):
        path = pipe.interpolate(a, b, 5, method=method)  # type: ignore[arg-type]
        assert path.shape == (5, 3, CFG.height, CFG.width)
        ends = [p.mix(pose=Factors(p.fg, p.bg, pipe.decode_poses(p.pose))) for p in (a, b)]
        assert torch.allclose(path[0], pipe.render(ends[0])[0], atol=1e-5)
        assert torch.allclose(path[-1], pipe.render(ends[1])[0], atol=1e-5)
    fg_only = pipe.interpolate(a, b, 3, factors=["fg"])
    assert torch.equal(fg_only[0], pipe.render(a)[0])


def test_inverse_interpolation_runs_through_phi() -> None:
    pipe = _pipe()
    people = pipe.sample_factors([0, 1], seed=5)
    path = pipe.interpolate(
        people.select([0]), people.select([1]), 4, method="inverse", inversion_steps=20
    )
    assert path.shape == (4, 3, CFG.height, CFG.width) and torch.isfinite(path).all()


def test_slerp_keeps_the_norm_between_orthogonal_unit_vectors() -> None:
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = slerp(a, b, torch.tensor([0.5]))
    assert torch.allclose(mid, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    same = slerp(a, a, torch.tensor([0.3]))  # parallel: falls back to linear
    assert torch.allclose(same, a)


def test_precision_and_layout_options() -> None:
    reference = _pipe().sample([0, 1], seed=1)
    assert torch.allclose(_pipe(channels_last=True).sample([0, 1], seed=1), reference, atol=1e-5)
    bf16 = _pipe(precision="bf16").sample([0, 1], seed=1)
    assert (bf16 - reference).abs().max() < 0.1
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        _pipe(precision="fp16")
    with pytest.raises(ValueError, match="batch_size"):
        _pipe(batch_size=0)


def test_compiled_decoder_gives_the_same_images() -> None:
    reference = _pipe().sample([0, 1, 2], seed=1)
    compiled = _pipe(compile="eager").sample([0, 1, 2], seed=1)
    assert torch.equal(compiled, reference)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled model missing")
def test_phi_inversion_reduces_the_distance_tenfold_on_the_bundled_model(tmp_path: Path) -> None:
    """Targets Φ can reach (Φ of other noise) come ten times closer; real people's embeddings
    at least six times (the foreground ones lie slightly off Φ's range: docs/quality.md)."""
    from dpig_core.data.synth import write_market_dataset

    write_market_dataset(tmp_path, identities=4, per_identity=2, height=64, width=32, seed=77,
                         progress=False)  # fmt: skip
    pipe = DPIGPipeline.from_pretrained(BUNDLED, batch_size=8)
    people = _people(pipe, tmp_path, 4)
    reachable = pipe.sample_factors(list(range(4)), seed=123)
    for factor in ("fg", "bg", "pose"):
        for targets, needed in ((reachable, 10), (people, 6)):
            codes = getattr(targets, factor)
            inv = pipe.invert(factor, codes, seed=1)
            ratio = inv.initial_distance.mean() / inv.final_distance.mean()
            assert ratio >= needed, f"{factor}: only {ratio:.1f}× closer"


def test_images_on_device_gives_the_same_images() -> None:
    torch.manual_seed(0)
    model = DPIG(PRESETS["tiny"])
    plain = DPIGPipeline(model, batch_size=3).sample([0, 1, 2, 3], seed=1)
    kept = DPIGPipeline(model, batch_size=3, images_on_device=True).sample([0, 1, 2, 3], seed=1)
    assert kept.dtype == torch.float32 and torch.equal(plain, kept)
