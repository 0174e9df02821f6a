"""The native seeded draws and DELLA's native per-row ranks against torch: the same bits."""

from __future__ import annotations

import pytest
import torch

from merge_engine import native, sparsify
from merge_engine.native import draws as native_draws
from merge_engine.randomness import TensorRandom, derive_seed

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels on this machine")

SHAPES = [(1,), (623,), (624,), (625,), (1249,), (1000, 37), (70001,)]


def torch_only(monkeypatch) -> None:
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", True)


@pytest.mark.parametrize("seed_index", range(12))
def test_native_generator_gives_torch_rand_bits(seed_index) -> None:
    # 63-bit seeds as the engine derives them, plus the extremes of the 32 bits torch keeps
    seed = [0, 1, 2 ** 32 - 1, 2 ** 63 - 1][seed_index] if seed_index < 4 else \
        derive_seed(seed_index, f"model.layers.{seed_index}.mlp.up_proj.weight", seed_index % 3)
    for shape in SHAPES:
        want = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(native_draws.uniform(shape, seed).view(torch.int32), want.view(torch.int32))
        for keep in (0.5, 0.1, 1 / 3, 0.999, 0.0, 1.0):
            mask = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep)
            assert torch.equal(native_draws.keep_mask(shape, seed, keep), mask.view(torch.uint8))


def test_tensor_random_draws_the_same_with_and_without_kernels(monkeypatch) -> None:
    shape = (97, 129)  # above randomness.NATIVE_MIN
    fast = TensorRandom(11, "w")
    got = [fast.uniform(shape, 0), fast.keep_mask(0.3, shape, 1), fast.bernoulli(0.7, shape, 2)]
    torch_only(monkeypatch)
    slow = TensorRandom(11, "w")
    want = [slow.uniform(shape, 0), slow.keep_mask(0.3, shape, 1), slow.bernoulli(0.7, shape, 2)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _awkward(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 deltas with long runs of equal magnitudes, +-0.0 and both signs of each tie."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 0.01).bfloat16()
    flat = x.view(-1)
    flat[:5000] = (torch.randint(-2, 3, (5000,), generator=g).float() * 2 ** -9).bfloat16()
    flat[5000:6000] = -0.0
    flat[6000:6100] = 3.0  # a run of the largest magnitude crossing rows
    return x


@pytest.mark.parametrize("shape", [(301, 257), (2, 40000), (70000, 1), (1, 70000), (256, 1024)])
def test_della_native_ranks_give_the_torch_probabilities(monkeypatch, shape) -> None:
    delta = _awkward(shape, sum(shape))
    got = [sparsify.della_keep_probs(delta, d, e) for d, e in ((0.5, 0.1), (0.3, 0.25), (0.7, 0.05))]
    delta_nan = delta.clone()
    delta_nan.view(-1)[7] = float("nan")  # a NaN row: the torch ranking decides
    got.append(sparsify.della_keep_probs(delta_nan, 0.5, 0.1))
    torch_only(monkeypatch)
    want = [sparsify.della_keep_probs(delta, d, e) for d, e in ((0.5, 0.1), (0.3, 0.25), (0.7, 0.05))]
    want.append(sparsify.della_keep_probs(delta_nan, 0.5, 0.1))
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def _spanning(rows: int, cols: int, exponents: int, seed: int) -> torch.Tensor:
    """bf16 deltas whose magnitudes span about ``exponents`` binary exponents per row, with zeros
    and ties: a narrow span is ranked by counting every key, a wide one by the radix sort."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-exponents // 2, exponents // 2 + 1, (rows, cols), generator=g).float())
    sign = torch.randint(0, 2, (rows, cols), generator=g).float() * 2 - 1
    x = (sign * (1 + torch.rand(rows, cols, generator=g)) * scale * 2 ** -10).bfloat16()
    # every third row spans 60 exponents: rows of one tensor take both paths, in turn
    x[::3] *= torch.exp2(torch.randint(-30, 31, x[::3].shape, generator=g).float()).bfloat16()
    x.view(-1)[::7] = 0.0
    x[4] = -0.0  # a row of zeros only
    n = x.numel() // 11
    x.view(-1)[1:11 * n:11] = x.view(-1)[3:11 * n:11]  # ties at distant columns
    return x


@pytest.mark.parametrize("exponents", [0, 3, 40, 200])  # counted (narrow) ... radix-sorted (wide)
@pytest.mark.parametrize("cols", [96, 257, 2048])
def test_della_native_drop_counts_and_sorts_the_torch_ranks(monkeypatch, exponents, cols) -> None:
    delta = _spanning(300, cols, exponents, exponents * 1000 + cols)
    probs = sparsify.della_keep_probs(delta, 0.5, 0.1)
    kept = sparsify.della_drop(delta, 0.5, 0.1, TensorRandom(5, "w"), 1, rescale=True, paper_rescale=False)
    torch_only(monkeypatch)
    assert torch.equal(probs.view(torch.int32), sparsify.della_keep_probs(delta, 0.5, 0.1).view(torch.int32))
    want = sparsify.della_drop(delta, 0.5, 0.1, TensorRandom(5, "w"), 1, rescale=True, paper_rescale=False)
    assert torch.equal(kept.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("shape", [(257, 1000), (5, 30001), (1200, 640)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_della_kernel_drawing_row_by_row_equals_drawing_ahead(shape, threads) -> None:
    """The CPU executor no longer draws DELLA's uniforms ahead: the kernel makes each thread's
    rows' draws itself after skipping the generator to its first row. Same keep mask as torch's
    draws of the seed against the rank probabilities, for any thread count (skips of partial
    624-blocks), and the same trimmed delta whether the engine drew ahead (GPU runs) or not."""
    delta = _spanning(*shape, 3, shape[0] + shape[1])
    table = sparsify._rank_probs(torch.arange(shape[1], dtype=torch.float32), shape[1], 0.4, 0.15)
    seed = derive_seed(11, "model.layers.0.mlp.up_proj.weight", 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seeded = native_draws.row_rank_keep_seeded(delta, table, seed)
    finally:
        torch.set_num_threads(before)
    # torch's own: the draws of the seed's generator against the rank probabilities
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    assert seeded is not None and torch.equal(seeded, u < native_draws.row_rank_probs(delta, table))
    assert 0.3 < seeded.float().mean() < 0.5  # the mask is not trivially equal (all kept / none)
    rng = TensorRandom(11, "model.layers.0.mlp.up_proj.weight",
                       {(2, None): native_draws.uniform(shape, seed)})
    drawn = sparsify.della_drop(delta, 0.4, 0.15, rng, 2, rescale=True, paper_rescale=False)
    made = sparsify.della_drop(delta, 0.4, 0.15, TensorRandom(11, "model.layers.0.mlp.up_proj.weight"),
                               2, rescale=True, paper_rescale=False)
    assert torch.equal(drawn.view(torch.int16), made.view(torch.int16))
