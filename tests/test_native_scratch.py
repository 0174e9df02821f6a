"""The scratch pool of the native kernels (merge_engine.native.empty / recycle): buffers given back
are reused, never handed out twice, and reusing them (filled with garbage) never changes a merge's bits."""

from __future__ import annotations

import pytest
import torch

from merge_engine import native
from merge_engine.errors import MergeError
from merge_engine.methods.registry import get_method
from merge_engine.randomness import TensorRandom
from tests.test_task_vectors import CASES, bits

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels on this machine")

BIG = (1031, 2311)  # 2.4M entries: bf16 deltas (4.8 MB) and float32 draws go through the pool


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.setattr(native, "_scratch", type(native._scratch)())
    monkeypatch.setattr(native, "_scratch_bytes", 0)


def test_a_buffer_given_back_is_reused_once_and_views_are_left_alone(monkeypatch) -> None:
    a = native.empty((1024, 4096), torch.bfloat16)
    ptr = a.data_ptr()
    native.recycle(a[1:])  # not the whole buffer
    native.recycle(a.t())  # not contiguous
    assert native._scratch_bytes == 0
    native.recycle(a)
    native.recycle(a)  # twice: kept once
    assert native._scratch_bytes == a.numel() * 2
    b = native.empty(2 * 1024 * 1024, torch.float32)  # same bytes, another dtype and shape
    assert b.data_ptr() == ptr and b.shape == (2 * 1024 * 1024,) and b.dtype == torch.float32
    c = native.empty((1024, 4096), torch.bfloat16)
    assert c.data_ptr() != ptr and native._scratch_bytes == 0
    monkeypatch.setattr(native, "SCRATCH_BYTES", 3 * b.numel() * 4 // 2)
    native.recycle(b)
    native.recycle(c)  # over the cap: the least recently given back (b) leaves
    assert [t.data_ptr() for ts in native._scratch.values() for t in ts] == [c.data_ptr()]


def test_the_pool_cap_comes_from_evomerge_scratch(monkeypatch) -> None:
    monkeypatch.setattr(native, "SCRATCH_BYTES", None)  # read from the environment at first use
    monkeypatch.setenv("EVOMERGE_SCRATCH", "0")
    a = native.empty((1024, 4096), torch.bfloat16)
    native.recycle(a)
    assert native.scratch_cap() == 0 and native._scratch_bytes == 0  # 0 keeps nothing
    monkeypatch.setattr(native, "SCRATCH_BYTES", None)
    monkeypatch.setenv("EVOMERGE_SCRATCH", "12MiB")
    native.recycle(a)
    assert native.scratch_cap() == 12 << 20 and native._scratch_bytes == a.numel() * 2
    monkeypatch.setattr(native, "SCRATCH_BYTES", None)
    monkeypatch.setenv("EVOMERGE_SCRATCH", "plenty")
    with pytest.raises(MergeError, match="EVOMERGE_SCRATCH: cannot read size 'plenty'; use e.g. 4GiB"):
        native.recycle(native.empty((1024, 4096), torch.bfloat16))


def _models() -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(BIG, generator=g) * 0.02).bfloat16()
    xs = [(base.float() + torch.randn(BIG, generator=g) * 0.002).bfloat16() for _ in range(3)]
    return xs, base


# each method's first case, and SCE with a variance selection (its variance goes through the pool)
ONE_EACH = list({m: (m, kw) for m, kw in reversed(CASES)}.values()) + [
    c for c in CASES if c[0] == "sce" and c[1]["select_topk"] == 0.3]


@pytest.mark.parametrize("method,kwargs", ONE_EACH, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ONE_EACH)])
def test_recycled_garbage_buffers_give_the_same_bits(method, kwargs) -> None:
    xs, base = _models()
    fn = get_method(method).fn

    def run() -> torch.Tensor:
        extra = {"rng": TensorRandom(7, "t")} if get_method(method).random else {}
        return fn(xs, base, **kwargs, **extra)
    first = run()
    assert native._scratch_bytes > 0  # the deltas (and draws) went back to the pool
    for free in native._scratch.values():
        for buf in free:
            buf.fill_(0xFF)  # NaN in bf16 and float32, "kept" in a mask
    second = run()
    assert torch.equal(bits(first), bits(second))


@pytest.mark.parametrize("n_models", [1, 2, 3, 4, 5])
def test_variance_kernel_gives_torch_bits_for_any_model_count(n_models) -> None:
    """var_bf16 divides by power-of-two counts as a multiplication: the same bits as torch's
    Welford, with zeros of both signs, tiny and huge values, NaN and infinities."""
    from merge_engine.native import sparse as native_sparse
    g = torch.Generator().manual_seed(n_models)
    deltas = []
    for k in range(n_models):
        d = torch.randn(70_001, generator=g) * torch.logspace(-30, 30, 70_001)
        d[:50] = -0.0 if k % 2 else 0.0
        d[50 + k] = float("nan")
        d[60 + k] = float("inf") if k % 2 else float("-inf")
        deltas.append(d.bfloat16())
    got = native_sparse.variance(deltas)
    want = torch.stack(deltas).var(dim=0, unbiased=False)
    assert torch.equal(bits(got), bits(want))
