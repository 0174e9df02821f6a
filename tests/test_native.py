"""The optional native kernel against the torch path it replaces: same bits, or not used at all."""

from __future__ import annotations

import shutil

import pytest
import torch

from merge_engine import native
from merge_engine.methods.linear import linear

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def torch_path(monkeypatch) -> None:
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", True)


@pytest.mark.skipif(not HAS_CC or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="needs a C compiler and an AVX2/AVX512 torch build")
def test_kernel_builds_here() -> None:
    assert native.available()


@pytest.mark.parametrize("n", [native.MIN_ENTRIES, 1_000_003, native.MIN_ENTRIES + 3 * 2048 + 5])
@pytest.mark.parametrize("weights,normalize", [([0.4, 0.3, 0.2, 0.1], True),
                                               ([0.5, -0.25, 0.8, 0.33], True),
                                               ([0.5, -0.25, 0.8, 0.33], False),
                                               ([1.0], True)])
def test_native_linear_gives_the_torch_bits(monkeypatch, n, weights, normalize) -> None:
    if not native.available():
        pytest.skip("no native kernel on this machine")
    gen = torch.Generator().manual_seed(n)
    xs = [(torch.randn(n, generator=gen) * 0.02).bfloat16() for _ in weights]
    xs[0][:7] = 0.0
    xs[-1][3:9] = -0.0
    xs[0][-5:] = 3.0e38  # sums that overflow to inf in float32
    fast = native.weighted_sum_bf16(xs, weights, 0.75)
    assert fast is not None and fast.dtype == torch.bfloat16
    got = linear(xs, None, weight=weights, normalize=normalize)
    torch_path(monkeypatch)
    assert native.weighted_sum_bf16(xs, weights, None) is None
    want = linear(xs, None, weight=weights, normalize=normalize)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_kernel_is_skipped_where_it_does_not_apply() -> None:
    small = [torch.ones(10, dtype=torch.bfloat16)] * 2
    assert native.weighted_sum_bf16(small, [0.5, 0.5], None) is None
    big = torch.ones(native.MIN_ENTRIES, dtype=torch.bfloat16)
    assert native.weighted_sum_bf16([big.float(), big.float()], [0.5, 0.5], None) is None
    assert native.weighted_sum_bf16([big, big.reshape(2, -1).t()], [0.5, 0.5], None) is None


def test_native_off_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert not native.available()


def test_native_result_does_not_depend_on_the_thread_count() -> None:
    if not native.available():
        pytest.skip("no native kernel on this machine")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(3 * native.MIN_ENTRIES + 11, generator=gen).bfloat16() for _ in range(3)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(native.weighted_sum_bf16(xs, [0.2, 0.5, 0.3], 1.0000001))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r.view(torch.int16), results[0].view(torch.int16)) for r in results)
