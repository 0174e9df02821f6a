"""Helpers for the merge-method tests: inputs, and calling a method the way the planner does."""

from __future__ import annotations

from typing import Any

import torch

from merge_engine.methods.spec import MethodSpec
from merge_engine.randomness import TensorRandom

TENSOR_NAME = "model.layers.0.mlp.down_proj.weight"

# Values that make a method do real work in tests (sparsify, interpolate part-way);
# any parameter not listed takes its declared default, or its search-range middle.
ACTIVE = {"density": 0.6, "gamma": 0.05, "epsilon": 0.1, "t": 0.3, "select_topk": 0.5}


def model_count(spec: MethodSpec, want: int = 3) -> int:
    """How many non-base models to feed ``spec``: ``want`` clipped to its limits."""
    n = max(spec.min_models, want)
    return min(n, spec.max_models) if spec.max_models is not None else n


def make_inputs(spec: MethodSpec, n: int, shape: tuple[int, ...] = (8, 12), *,
                dtype: torch.dtype = torch.float32, seed: int = 0,
                with_base: bool | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A base ~ N(0, 1) and ``n`` fine-tunes = base + 0.1 * N(0, 1) (float32 draws, then cast).

    ``with_base`` defaults to whether the method takes a base at all.
    """
    if with_base is None:
        with_base = spec.base != "unused"
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tensors = [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    return tensors, (base.to(dtype) if with_base else None)


def param_values(spec: MethodSpec, n: int, *, active: bool = True,
                 **overrides: Any) -> dict[str, Any]:
    """Every declared parameter by recipe name: overrides, else ACTIVE values, else defaults.

    Per-model values are lists of length ``n``; required weights default to
    ``0.3, 0.5, 0.7, ...`` so models are distinguishable.
    """
    values: dict[str, Any] = {}
    for p in spec.params:
        if p.name in overrides:
            v = overrides[p.name]
        elif active and p.name in ACTIVE:
            v = ACTIVE[p.name]
        elif p.name == "weight" and p.default is None:
            v = [0.3 + 0.2 * i for i in range(n)]
        elif p.default is not None:
            v = p.default
        else:
            v = sum(p.search) / 2
        if p.per_model and not isinstance(v, list):
            v = [v] * n
        values[p.name] = v
    return values


def call(spec: MethodSpec, tensors: list[torch.Tensor], base: torch.Tensor | None,
         params: dict[str, Any], *, seed: int = 0, name: str = TENSOR_NAME) -> torch.Tensor:
    """Call ``spec.fn`` as the planner does (keyword names, ``rng`` for random methods)."""
    kwargs = {spec.param(k).kwarg: v for k, v in params.items()}
    if spec.random:
        kwargs["rng"] = TensorRandom(seed, name)
    with torch.no_grad():
        return spec.fn(list(tensors), base, **kwargs)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN-safe, -0.0 vs 0.0 counts as different)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)))
