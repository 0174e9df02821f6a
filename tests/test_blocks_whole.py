"""The whole-tensor (GPU-sized) block path of the sparsifying methods, forced on the CPU, gives the
bits of the CPU block path: every output entry depends only on the entries at its position once
the whole-tensor trims (top-k, draws, ranks, norms) are made, and those never run in blocks."""

from __future__ import annotations

import pytest
import torch

from merge_engine import blocks, native
from merge_engine.methods.registry import get_method
from merge_engine.randomness import TensorRandom

SHAPE = (613, 521)  # 319k entries: more than one CPU block (blocks.BLOCK), a partial last one

CASES = [
    ("ties", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.3, 0.9], normalize=True, rescale=False,
                  lambda_=1.0, int8_mask=False)),
    ("breadcrumbs_ties", dict(weight=[0.5, 0.3, 0.2], density=[0.3, 0.9, 0.5], gamma=[0.1, 0.0, 0.05],
                              normalize=True, rescale=True, lambda_=1.2, int8_mask=False)),
    ("dare_ties", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.2, 1.0], normalize=True, rescale=True,
                       lambda_=1.0, int8_mask=False, paper_rescale=False)),
    ("della_linear", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.4, 0.6], epsilon=[0.1, 0.1, 0.2],
                          normalize=False, rescale=True, lambda_=1.0, int8_mask=False,
                          paper_rescale=True)),
    ("sce", dict(select_topk=0.4, int8_mask=False)),
]


@pytest.mark.parametrize("method,kwargs", CASES, ids=[m for m, _ in CASES])
def test_whole_tensor_blocks_give_the_cpu_block_bits(monkeypatch, method, kwargs) -> None:
    monkeypatch.setattr(native, "_lib", None)  # the torch path: the one CUDA runs
    monkeypatch.setattr(native, "_tried", True)
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(SHAPE, generator=g) * 0.02).bfloat16()
    xs = [(base.float() + torch.randn(SHAPE, generator=g) * 0.002).bfloat16() for _ in range(3)]
    fn = get_method(method).fn

    def run() -> torch.Tensor:
        extra = {"rng": TensorRandom(5, "w")} if get_method(method).random else {}
        return fn(xs, base, **kwargs, **extra)

    assert xs[0].numel() > blocks.BLOCK
    small = run()
    monkeypatch.setattr(blocks, "BLOCK", 1 << 30)  # what block_size gives on a GPU: one block
    whole = run()
    assert torch.equal(small.view(torch.int16), whole.view(torch.int16))
