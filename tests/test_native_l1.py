"""The fused native norms (native/l1.py) against ``methods._reduce.total`` over torch temporaries:
the same float32 bits for plain, masked, squared and variance-selected sums, on sizes with one,
two and three chunk levels, with -0.0, ties, NaN and inf; and the fused rescale of a DARE trim."""

from __future__ import annotations

import pytest
import torch

from merge_engine import native
from merge_engine.methods._reduce import total
from merge_engine.native import l1
from merge_engine.sparsify import dare_drop, rescale_l1
from merge_engine.randomness import TensorRandom

pytestmark = pytest.mark.skipif(not native.available() or not l1.usable(torch.zeros(1 << 16, dtype=torch.bfloat16)),
                                reason="no native norms on this machine")

SIZES = [1 << 16, (1 << 16) + 5, 1000003, 1024 * 1024 + 1024 * 3 + 17]


def f32bits(t: torch.Tensor) -> int:
    return int(t.reshape(()).view(torch.int32))


def delta(n: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(n, generator=g) * scale).bfloat16()
    d[:50] = -0.0
    d[50:4000] = 2 ** -9  # many equal magnitudes
    return d


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 60.0])
def test_totals_are_the_torch_bits(n, scale) -> None:
    d = delta(n, n % 97, scale)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(n, generator=g) < 0.4).to(torch.uint8)
    assert f32bits(l1.total(d)) == f32bits(total(d.abs()))
    assert f32bits(l1.total(d, mask)) == f32bits(total((d * mask).abs()))
    assert f32bits(l1.total(d, mask.bool())) == f32bits(total((d * mask.bool()).abs()))
    assert f32bits(l1.total(d, None, square=True)) == f32bits(total(d.float() ** 2))
    var = delta(n, 5, scale).abs()
    keys = var.view(torch.int16)
    lo, lo_cut = int(keys[n // 2]), n // 3
    keep = (keys > lo)
    keep[:lo_cut + 1] |= keys[:lo_cut + 1] == lo
    want = total((d * keep).float() ** 2)
    assert f32bits(l1.total(d, None, square=True, var=var, top=(lo, lo_cut))) == f32bits(want)


def test_mask_scale_is_the_torch_bits_and_non_finite_deltas_take_the_torch_path() -> None:
    n = (1 << 16) + 3
    d = delta(n, 3, 1.0)
    mask = (torch.arange(n) % 3 != 0).to(torch.uint8)
    s = torch.tensor(1.37, dtype=torch.float32)
    assert torch.equal(l1.mask_scale(d, mask, float(s)).view(torch.int16), ((d * mask) * s).view(torch.int16))
    assert torch.equal(l1.mask_scale(d, mask, None).view(torch.int16), (d * mask).view(torch.int16))
    d[7], d[9], d[11] = float("nan"), float("inf"), float("-inf")
    assert torch.isnan(l1.total(d)) and torch.isnan(total(d.abs()))
    kept = d * mask
    want = kept * (total(d.abs()) / total(kept.abs()))  # NaN payloads of torch's vectorized rounding
    assert torch.equal(rescale_l1(d, kept).view(torch.int16), want.view(torch.int16))


def test_fused_dare_and_rescale_equal_the_torch_expressions() -> None:
    d = delta(301 * 257, 4, 0.01).reshape(301, 257)
    rng = TensorRandom(3, "w")
    mask = rng.keep_mask(0.3, d.shape, 1)
    kept = d * mask
    want = kept * (total(d.abs()) / total(kept.abs()))
    got = dare_drop(d, 0.3, TensorRandom(3, "w"), 1, rescale=True, paper_rescale=False)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.equal(rescale_l1(d, kept).view(torch.int16), want.view(torch.int16))
    zero = torch.zeros_like(d)
    assert rescale_l1(zero, zero) is zero  # below RESCALE_EPS: unchanged, as the torch path


def test_nonfinite_count_and_all_finite() -> None:
    from merge_engine.plan import all_finite

    d = delta(1 << 17, 8, 1.0)
    assert l1.nonfinite(d) == 0 and all_finite(d)
    d[5], d[70000], d[-1] = float("nan"), float("inf"), float("-inf")
    d[6] = 3.3e38  # the largest finite bf16 range stays finite
    assert l1.nonfinite(d) == 3 and not all_finite(d)
    assert l1.nonfinite(d.float()) is None and not all_finite(d.float())
