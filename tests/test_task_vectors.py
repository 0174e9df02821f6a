"""The native fast path of the sparsifying methods against the torch reference, and the per-run
task-vector cache of the in-memory merger: same bits everywhere, with ties, zeros and -0.0."""

from __future__ import annotations

import pytest
import torch

from merge_engine.sizes import parse_bytes
from merge_engine import native, selection
from merge_engine.apply import InMemoryMerger
from merge_engine.methods.registry import get_method
from merge_engine.native import sparse as native_sparse
from merge_engine.randomness import TensorRandom
from merge_engine.recipe import parse_recipe
from merge_engine.sparsify import top_k_mask
from tests.fixtures import make_tiny_llama

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels on this machine")

SHAPE = (301, 257)  # above native.MIN_ENTRIES, odd, not a multiple of any chunk


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def awkward_models(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A bf16 base and three "fine-tunes": small noise, many exactly tied deltas, zero deltas,
    +-0.0 entries, and one model equal to the base in a whole region."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(SHAPE, generator=g) * 0.02).bfloat16()
    base.view(-1)[100:140] = -0.0
    xs = []
    for i in range(3):
        noise = torch.randn(SHAPE, generator=g) * 0.002
        noise.view(-1)[: 20000] = torch.randint(-2, 3, (20000,), generator=g).float() * 2 ** -9
        x = (base.float() + noise).bfloat16()
        x.view(-1)[30000 + 1000 * i: 40000] = base.view(-1)[30000 + 1000 * i: 40000]
        x.view(-1)[90:120] = 0.0 if i else -0.0
        xs.append(x)
    return xs, base


def torch_only(monkeypatch) -> None:
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", True)


CASES = [
    ("ties", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.3, 0.9], normalize=True, rescale=False,
                  lambda_=1.0, int8_mask=False)),
    ("ties", dict(weight=[1.0, -0.4, 0.0], density=[0.0, 1.0, 1e-9], normalize=False, rescale=True,
                  lambda_=0.7, int8_mask=False)),
    ("breadcrumbs", dict(weight=[0.5, 0.3, 0.2], density=[0.6, 0.95, 1.0], gamma=[0.01, 0.1, 0.0],
                         normalize=True, rescale=False, lambda_=1.0, int8_mask=False)),
    ("breadcrumbs_ties", dict(weight=[0.5, 0.3, 0.2], density=[0.3, 0.0, 0.5], gamma=[0.6, 0.0, 0.0],
                              normalize=True, rescale=True, lambda_=1.2, int8_mask=False)),
    ("dare_ties", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.2, 1.0], normalize=True, rescale=True,
                       lambda_=1.0, int8_mask=False, paper_rescale=False)),
    ("dare_linear", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.0, 0.7], normalize=False, rescale=True,
                         lambda_=1.0, int8_mask=False, paper_rescale=True)),
    ("della", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.4, 0.6], epsilon=[0.1, 0.1, 0.2],
                   normalize=True, rescale=True, lambda_=1.0, int8_mask=False, paper_rescale=False)),
    ("della_linear", dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.0, 0.8], epsilon=[0.2, 0.1, 0.15],
                          normalize=False, rescale=True, lambda_=0.9, int8_mask=False, paper_rescale=True)),
    ("sce", dict(select_topk=1.0, int8_mask=False)),
    ("sce", dict(select_topk=0.3, int8_mask=False)),
    ("sce", dict(select_topk=0.0, int8_mask=False)),
]


@pytest.mark.parametrize("method,kwargs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_fast_path_gives_the_torch_bits(monkeypatch, method, kwargs) -> None:
    xs, base = awkward_models(len(method))
    assert native_sparse.usable(base, *xs)
    fn = get_method(method).fn
    extra = {"rng": TensorRandom(7, "t")} if get_method(method).random else {}
    fast = fn(xs, base, **kwargs, **extra)
    torch_only(monkeypatch)
    extra = {"rng": TensorRandom(7, "t")} if get_method(method).random else {}
    want = fn(xs, base, **kwargs, **extra)
    assert fast.dtype == want.dtype == torch.bfloat16
    assert torch.equal(bits(fast), bits(want))


def test_sce_with_inf_and_nan_deltas_gives_the_torch_bits(monkeypatch) -> None:
    xs, base = awkward_models(5)
    xs[1].view(-1)[500:520] = float("nan")
    xs[2].view(-1)[600:620] = float("inf")
    fn = get_method("sce").fn
    fast = [fn(xs, base, select_topk=t, int8_mask=False) for t in (1.0, 0.5)]
    torch_only(monkeypatch)
    for t, got in zip((1.0, 0.5), fast):
        assert torch.equal(bits(got), bits(fn(xs, base, select_topk=t, int8_mask=False)))


def test_selections_equal_stable_sorts() -> None:
    xs, base = awkward_models(3)
    delta, counts = native_sparse.delta_and_histogram(xs[0].reshape(-1), base.reshape(-1))
    assert torch.equal(bits(delta), bits((xs[0] - base).reshape(-1)))
    hist = selection.Histogram.from_counts(counts)
    n = delta.numel()
    mags = delta.abs()
    order = torch.sort(mags.float(), stable=True).indices  # ascending, ties by position
    for k in (1, 2, 19999, n // 2, n - 1, n):
        kept = native_sparse.select(delta, selection.top_k(delta, hist, k)) if k < n else delta
        want = delta * top_k_mask(mags, k, nonnegative=True)
        assert torch.equal(bits(kept), bits(want)), k
    for first, stop in ((0, n), (5, n - 7), (20000, 20001), (1000, 60000)):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[first:stop]] = True
        kept = native_sparse.select(delta, selection.band(delta, hist, first, stop))
        assert torch.equal(bits(kept), bits(delta * mask)), (first, stop)


RECIPE = """merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: {d}}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def wide_zoo(tmp_path_factory):
    """Models whose MLP weights are large enough for the fast path (512 x 256)."""
    root = tmp_path_factory.mktemp("wide")
    kw = dict(num_layers=1, hidden=256, intermediate=512, dtype=torch.bfloat16)
    base = make_tiny_llama(root / "base", seed=0, **kw)
    return {"base": base, "a": make_tiny_llama(root / "a", seed=1, perturb_from=base, **kw),
            "b": make_tiny_llama(root / "b", seed=2, perturb_from=base, **kw)}


def _recipe(zoo, density: float):
    import yaml

    return parse_recipe(yaml.safe_load(RECIPE.format(d=density, **{k: str(v) for k, v in zoo.items()})))


def _merged(zoo, densities, **merger_kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.bfloat16)
    states = []
    with InMemoryMerger(model, **merger_kwargs) as merger:
        for d in densities:
            merger.apply(_recipe(zoo, d))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        report = merger.cache_report()
    return states, report


def test_task_vector_cache_is_reused_capped_and_gives_the_same_bits(wide_zoo) -> None:
    densities = [0.5, 0.2, 0.5]
    cached, report = _merged(wide_zoo, densities)
    plain, off = _merged(wide_zoo, densities, task_vector_cache_bytes=0)
    capped, small = _merged(wide_zoo, densities, task_vector_cache_bytes=300_000)
    for a, b, c in zip(cached, plain, capped):
        for name in a:
            assert torch.equal(bits(a[name]), bits(b[name])) and torch.equal(bits(a[name]), bits(c[name])), name
    # per model: the bf16 delta of every tensor the fast path takes, plus small histograms
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(wide_zoo["base"])
    sizes = [cfg.hidden_size ** 2] * 4 + [cfg.hidden_size * cfg.intermediate_size] * 3
    taken = [n for n in sizes if n >= native.MIN_ENTRIES]
    most = 2 * sum(taken) + len(taken) * 16 * native_sparse.KEYS  # a histogram is at most 16 B a key
    assert set(report["bytes_by_model"]) == {0, 1}
    assert all(2 * sum(taken) < v <= most for v in report["bytes_by_model"].values()), report
    assert report["hits"] > 0 and report["refused"] == 0
    assert off["bytes"] == 0 and off["hits"] == 0
    assert small["bytes"] <= 300_000 and small["refused"] > 0


def test_the_space_caps_the_search_cache_and_the_run_reports_it(wide_zoo) -> None:
    """``task_vector_cache`` in a space (a size) is the cap of the resident candidate's cache,
    and the line a search logs after its trials says what it held per source model."""
    from evomerge.search.run import resident_candidate
    from evomerge.space import parse_space
    from evomerge.space.schema import SpaceError

    def space(cache):
        return parse_space({"name": "t", "method": "ties", "base_model": str(wide_zoo["base"]),
                            "models": [{"name": k, "model": str(wide_zoo[k])} for k in ("a", "b")],
                            "eval": {"tasks": ["smoke_mc"], "limit": 2}, "dtype": "bfloat16",
                            **({"task_vector_cache": cache} if cache is not None else {})})

    assert space(None).task_vector_cache == 4 << 30
    assert space("0").task_vector_cache == 0 and space(1024).task_vector_cache == 1024
    with pytest.raises(SpaceError, match="task_vector_cache: cannot read size 'lots'; use e.g. 4GiB"):
        space("lots")
    for cache, refused in (("300KiB", True), ("64M", False)):
        with resident_candidate(space(cache)) as candidate:
            assert candidate.merger.task_vectors.cap_bytes == parse_bytes(cache)
            assert candidate.cache_summary() is None  # nothing merged yet
            candidate.apply(_recipe(wide_zoo, 0.5))
            candidate.apply(_recipe(wide_zoo, 0.3))
            line = candidate.cache_summary()
            held = candidate.merger.cache_report()
        assert held["bytes"] <= parse_bytes(cache) and (held["refused"] > 0) == refused
        assert line.startswith(f"task-vector cache: {held['bytes'] / 2**20:.0f} MiB of "
                               f"{parse_bytes(cache) / 2**20:.0f} MiB (per source model: ")
        assert ("recomputed per candidate (raise task_vector_cache" in line) == refused
    with resident_candidate(space(0)) as candidate:
        candidate.apply(_recipe(wide_zoo, 0.5))
        assert candidate.cache_summary() is None
