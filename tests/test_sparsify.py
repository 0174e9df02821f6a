"""Radix top-k selection against a stable descending sort, on awkward inputs."""

from __future__ import annotations

import pytest
import torch

from merge_engine.sparsify import top_k_mask


def sorted_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the first k of a stable descending sort (ties go to the lower index)."""
    flat = scores.reshape(-1).double()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def awkward(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 29, generator=g)
    ties = torch.randint(-3, 4, (40, 25), generator=g).float() / 4  # many exact ties
    tiny = torch.randn(300, generator=g) * 1e-40  # float32 denormals (zero in half precision)
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, -0.0])
    wide = torch.cat([torch.randn(200, generator=g) * 10.0 ** torch.randint(-6, 6, (200,), generator=g),
                      torch.tensor([float("inf"), -float("inf"), 65000.0, -65000.0])])
    return [t.to(dtype) for t in (x, x.abs(), ties, ties.abs(), tiny, zeros, wide)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_top_k_mask_equals_a_stable_sort(dtype: torch.dtype) -> None:
    for seed in range(3):
        for scores in awkward(dtype, seed):
            n = scores.numel()
            for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n, n + 5}):
                want = sorted_top_k(scores, min(k, n))
                got = top_k_mask(scores, k)
                assert got.shape == scores.shape and got.dtype == torch.bool
                assert torch.equal(got, want), (dtype, seed, n, k)
                if not bool((scores < 0).any() or (scores.double().reciprocal() < 0).any()):
                    assert torch.equal(top_k_mask(scores, k, nonnegative=True), want), (dtype, seed, n, k)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixing_block_by_block_gives_the_same_bits(method: str, dtype: torch.dtype, monkeypatch) -> None:
    """Task vectors are mixed in blocks; the block size must not change a bit (tails included)."""
    from merge_engine import blocks
    from merge_engine.methods.registry import get_method
    from merge_engine.randomness import TensorRandom

    spec = get_method(method)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(123, 77, generator=gen).to(dtype)
    models = [(base.float() + 0.1 * torch.randn(123, 77, generator=gen)).to(dtype) for _ in range(3)]
    per_model = {"weight": [0.5, -0.3, 0.9], "density": [0.6, 0.5, 0.7], "epsilon": [0.1] * 3,
                 "gamma": [0.02] * 3}
    kwargs = {p.kwarg: per_model[p.name] if p.per_model else p.default for p in spec.params}
    kwargs[spec.param("normalize").kwarg] = True
    if spec.random:
        kwargs["rng"] = TensorRandom(7, "t")
    monkeypatch.setattr(blocks, "BLOCK", 10**9)
    whole = spec.fn(models, base, **kwargs)
    for block in (1000, 4096, 123 * 77 - 1):
        monkeypatch.setattr(blocks, "BLOCK", block)
        blocked = spec.fn(models, base, **kwargs)
        assert blocked.dtype == whole.dtype == dtype and blocked.shape == whole.shape
        assert torch.equal(blocked.view(-1).view(torch.uint8), whole.view(-1).view(torch.uint8)), block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.5, -0.5, 0.2], [1.0, 1.0, 1.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_sign_election_mixing_equals_comparing_signs(dtype, weights, normalize) -> None:
    """``_mix`` elects signs arithmetically; it must give the values of the textbook rule (a model
    contributes where its weighted sign equals the sign of the weighted sum, >= 0 counting as +),
    written here with comparisons, on columns that are all zero, cancel exactly or are sparse."""
    from merge_engine.sparsify import _mix, sign_agreement

    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(3, 4000, generator=g) * 0.01
    stacked[torch.rand(3, 4000, generator=g) < 0.5] = 0.0
    stacked[:, :300] = 0.0  # no model contributes
    stacked[0, 300:600] = -stacked[1, 300:600]  # weighted sums that may cancel
    stacked[:, 600:700] = -0.0
    stacked, base = stacked.to(dtype), (torch.randn(4000, generator=g) * 0.1).to(dtype)
    base[:100] = 0.0
    w = torch.tensor(weights, dtype=dtype).reshape(-1, 1)
    for lambda_ in (1.0, 0.7):
        got = _mix(stacked, base, w, normalize=normalize, lambda_=lambda_, elect_signs=True)
        weighted = stacked * w
        agree = sign_agreement(weighted)
        mixed = (weighted * agree).sum(dim=0)
        if normalize:
            divisor = (w * agree).sum(dim=0)
            mixed = mixed / divisor.masked_fill(divisor == 0, 1)
        want = (base + mixed * lambda_ if lambda_ != 1 else base + mixed).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
