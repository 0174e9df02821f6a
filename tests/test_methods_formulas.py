"""Each method against a reference written independently here (numpy, float64, plain loops),
plus the mergekit bugs we fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_engine.errors import MergeError
from merge_engine.methods.registry import get_method
from merge_engine.randomness import TensorRandom
from methods_helpers import TENSOR_NAME, call

SHAPE = (4, 6)
SEED = 11


def inputs(n: int = 3, shape: tuple[int, ...] = SHAPE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)], base


def a(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def run(method: str, tensors, base, **params):
    spec = get_method(method)
    n = len(tensors)
    full = {}
    for p in spec.params:
        v = params.get(p.name, p.default)
        full[p.name] = [v] * n if p.per_model and not isinstance(v, list) else v
    return call(spec, tensors, base, full, seed=SEED)


def check(out: torch.Tensor, ref: np.ndarray, tol: float = 1e-5):
    np.testing.assert_allclose(a(out), ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------- references
def uniform(i: int, shape) -> np.ndarray:
    """The draw the contract says model ``i`` of this tensor gets: U[0,1) from its own stream."""
    return a(TensorRandom(SEED, TENSOR_NAME).uniform(shape, i))


def l1_rescaled(delta: np.ndarray, kept: np.ndarray) -> np.ndarray:
    before, after = np.abs(delta).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * before / after


def sign_elected_mean(deltas, weights, normalize: bool) -> np.ndarray:
    out = np.zeros(deltas[0].shape)
    for idx in np.ndindex(out.shape):
        vals = [w * d[idx] for d, w in zip(deltas, weights)]
        majority = 1.0 if sum(vals) >= 0 else -1.0
        agree = [i for i, v in enumerate(vals) if np.sign(v) == majority]
        num = sum(vals[i] for i in agree)
        den = sum(weights[i] for i in agree)
        out[idx] = num / (den if den != 0 else 1.0) if normalize else num
    return out


def weighted_sum(deltas, weights, normalize: bool) -> np.ndarray:
    total = sum(w * d for d, w in zip(deltas, weights))
    w_sum = sum(weights)
    return total / (w_sum if abs(w_sum) >= 1e-8 else 1.0) if normalize else total


def ranks(values: np.ndarray) -> np.ndarray:
    """0 for the smallest; equal values ranked by position."""
    r = np.empty(values.size, dtype=np.int64)
    r[np.argsort(values, kind="stable")] = np.arange(values.size)
    return r


def slerp_ref(t: float, v0: np.ndarray, v1: np.ndarray, threshold: float | None = 0.9995):
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    cos = float(np.dot(v0 / n0, v1 / n1))
    if threshold is not None and abs(cos) > threshold:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(np.clip(cos, -1, 1))
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


# ---------------------------------------------------------------- linear family
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    xs, _ = inputs()
    w = [0.2, 0.5, 1.1]
    ref = sum(wi * a(x) for wi, x in zip(w, xs))
    if normalize:
        ref = ref / sum(w)
    check(run("linear", xs, None, weight=w, normalize=normalize), ref)


def test_linear_weights_summing_to_zero_is_rejected():
    xs, _ = inputs(2)
    with pytest.raises(MergeError, match=r"sum to 0.*normalize"):
        run("linear", xs, None, weight=[0.5, -0.5], normalize=True)
    # without normalisation nothing is divided: a plain difference
    check(run("linear", xs, None, weight=[0.5, -0.5], normalize=False),
          0.5 * a(xs[0]) - 0.5 * a(xs[1]))


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.7), (False, 0.4)])
def test_task_arithmetic(normalize, lam):
    xs, base = inputs()
    w = [0.3, -0.2, 0.8]
    mixed = weighted_sum([a(x) - a(base) for x in xs], w, normalize)
    check(run("task_arithmetic", xs, base, weight=w, normalize=normalize, **{"lambda": lam}),
          a(base) + lam * mixed)


# ---------------------------------------------------------------- TIES
def top_k_ref(delta: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return delta
    flat = delta.ravel()
    k = int(density * flat.size)
    r = ranks(-np.abs(flat) + 0.0)  # rank 0 = largest magnitude
    return np.where(r < k, flat, 0.0).reshape(delta.shape)


@pytest.mark.parametrize("density,normalize,lam", [(0.5, True, 1.0), (0.3, False, 0.8),
                                                   (1.0, True, 1.0)])
def test_ties(density, normalize, lam):
    xs, base = inputs()
    w = [0.7, 0.4, -0.5]
    deltas = [top_k_ref(a(x) - a(base), density) for x in xs]
    ref = a(base) + lam * sign_elected_mean(deltas, w, normalize)
    check(run("ties", xs, base, weight=w, density=density, normalize=normalize,
              **{"lambda": lam}), ref)


def test_ties_rescale_matches_l1_norm():
    xs, base = inputs()
    w = [0.7, 0.4, 0.5]
    deltas = [l1_rescaled(a(x) - a(base), top_k_ref(a(x) - a(base), 0.4)) for x in xs]
    check(run("ties", xs, base, weight=w, density=0.4, rescale=True),
          a(base) + sign_elected_mean(deltas, w, True))


def test_ties_density_below_one_entry_keeps_the_largest():
    """mergekit asserts when int(density * numel) == 0; we keep the single largest entry."""
    (x,), base = inputs(1)
    delta = a(x) - a(base)
    out = run("ties", [x], base, weight=[1.0], density=0.02)  # int(0.02 * 24) == 0
    got = a(out) - a(base)
    assert np.count_nonzero(np.abs(got) > 1e-6) == 1
    top = np.unravel_index(np.argmax(np.abs(delta)), delta.shape)
    assert got[top] == pytest.approx(delta[top], abs=1e-6)


def test_ties_density_zero_leaves_the_model_out():
    xs, base = inputs(2)
    both = run("ties", xs, base, weight=[0.5, 0.5], density=[0.0, 0.5])
    alone = run("ties", xs[1:], base, weight=[0.5], density=[0.5])
    torch.testing.assert_close(both, alone)


# ---------------------------------------------------------------- DARE
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale,paper", [(True, False), (True, True), (False, False)])
def test_dare(method, rescale, paper):
    xs, base = inputs()
    w, dens = [0.6, 0.3, 0.5], [0.5, 0.7, 0.4]
    deltas = []
    for i, x in enumerate(xs):
        delta = a(x) - a(base)
        kept = np.where(uniform(i, SHAPE) < dens[i], delta, 0.0)
        if rescale:
            kept = kept / dens[i] if paper else l1_rescaled(delta, kept)
        deltas.append(kept)
    mix = sign_elected_mean if method == "dare_ties" else weighted_sum
    ref = a(base) + mix(deltas, w, False)
    check(run(method, xs, base, weight=w, density=dens, rescale=rescale, paper_rescale=paper),
          ref)


def test_dare_keeps_about_density_of_entries():
    (x,), base = inputs(1, (100, 100))
    out = run("dare_linear", [x], base, weight=[1.0], density=[0.3], rescale=False)
    kept = (out != base).float().mean().item()
    assert abs(kept - 0.3) < 0.02


# ---------------------------------------------------------------- breadcrumbs
def breadcrumbs_ref(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    if density >= 1:
        return delta
    n = delta.size
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = n - n_keep - n_top
    if n_bot < 0:
        n_top, n_bot = n - n_keep, 0
    r = ranks(np.abs(delta.ravel()))  # 0 = smallest
    keep = (r >= n_bot) & (r < n - n_top)
    return np.where(keep, delta.ravel(), 0.0).reshape(delta.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(0.6, 0.1), (0.8, 0.3), (0.5, 0.01)])
def test_breadcrumbs(method, density, gamma):
    xs, base = inputs()
    w = [0.5, 0.8, 0.3]
    deltas = [breadcrumbs_ref(a(x) - a(base), density, gamma) for x in xs]
    mix = sign_elected_mean if method == "breadcrumbs_ties" else weighted_sum
    check(run(method, xs, base, weight=w, density=density, gamma=gamma),
          a(base) + mix(deltas, w, False))


def test_breadcrumbs_with_no_top_outliers_drops_nothing_from_the_top():
    """int(gamma * numel) == 0: mergekit's slice [n_bot:-0] keeps nothing; we keep the top."""
    (x,), base = inputs(1)
    delta = a(x) - a(base)
    got = a(run("breadcrumbs", [x], base, weight=[1.0], density=0.5, gamma=0.01)) - a(base)
    kept = np.abs(got) > 1e-6
    assert kept.sum() == 12  # int(0.5 * 24)
    assert np.abs(delta)[kept].min() >= np.abs(delta)[~kept].max()  # exactly the 12 largest


# ---------------------------------------------------------------- DELLA
def della_probs_ref(delta: np.ndarray, density: float, eps: float) -> np.ndarray:
    rows = delta.reshape(1, -1) if delta.ndim == 1 else delta
    probs = np.empty(rows.shape)
    for i, row in enumerate(rows):
        probs[i] = density - eps + ranks(np.abs(row)) / (row.size - 1) * 2 * eps
    return probs.reshape(delta.shape)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("paper", [False, True])
@pytest.mark.parametrize("shape", [SHAPE, (24,)], ids=["matrix", "vector"])
def test_della(method, paper, shape):
    xs, base = inputs(shape=shape)
    w, dens, eps = [0.6, 0.9, 0.4], [0.5, 0.6, 0.4], [0.1, 0.2, 0.05]
    deltas = []
    for i, x in enumerate(xs):
        delta = a(x) - a(base)
        probs = della_probs_ref(delta, dens[i], eps[i])
        kept = np.where(uniform(i, shape) < probs, delta, 0.0)
        deltas.append(kept / probs if paper else l1_rescaled(delta, kept))
    if method == "della":
        ref = a(base) + sign_elected_mean(deltas, w, True)
    else:
        ref = a(base) + weighted_sum(deltas, w, False)
    check(run(method, xs, base, weight=w, density=dens, epsilon=eps, paper_rescale=paper), ref)


def test_della_rejects_epsilon_reaching_zero_or_one():
    xs, base = inputs(1)
    with pytest.raises(MergeError, match="density - epsilon"):
        run("della", xs, base, weight=[1.0], density=[0.1], epsilon=[0.15])
    with pytest.raises(MergeError, match="density \\+ epsilon"):
        run("della_linear", xs, base, weight=[1.0], density=[0.9], epsilon=[0.15])


# ---------------------------------------------------------------- spherical
@pytest.mark.parametrize("t", [0.0, 0.25, 0.8, 1.0])
def test_slerp(t):
    (x,), base = inputs(1)
    ref = slerp_ref(t, a(base).ravel(), a(x).ravel()).reshape(SHAPE)
    check(run("slerp", [x], base, t=t), ref)


def test_slerp_of_nearly_colinear_tensors_is_lerp():
    (x,), base = inputs(1)
    other = 2.0 * base + 1e-4 * x
    check(run("slerp", [other], base, t=0.3), 0.7 * a(base) + 0.3 * a(other))


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(flatten, row_wise, with_base):
    (x0, x1), base = inputs(2)
    w = [0.3, 0.9]
    t = w[1] / sum(w)
    v0, v1 = a(x0), a(x1)
    if with_base:
        v0, v1 = v0 - a(base), v1 - a(base)
    if flatten:
        ref = slerp_ref(t, v0.ravel(), v1.ravel(), None).reshape(SHAPE)
    elif row_wise:  # mergekit's "row_wise" interpolates the vectors along dim 0 (columns)
        ref = np.stack([slerp_ref(t, v0[:, j], v1[:, j], None) for j in range(SHAPE[1])], axis=1)
    else:
        ref = np.stack([slerp_ref(t, v0[i], v1[i], None) for i in range(SHAPE[0])])
    if with_base:
        ref = ref + a(base)
    out = run("nuslerp", [x0, x1], base if with_base else None, weight=w,
              nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    check(out, ref)


def test_nuslerp_weights_summing_to_zero_use_the_midpoint():
    (x0, x1), _ = inputs(2)
    ref = slerp_ref(0.5, a(x0).ravel(), a(x1).ravel(), None).reshape(SHAPE)
    check(run("nuslerp", [x0, x1], None, weight=[0.5, -0.5]), ref)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp(with_base, normalize_weights):
    xs, base = inputs()
    w = np.array([0.2, 0.5, 0.3]) if normalize_weights else np.array([0.3, 0.6, 0.4])
    vs = np.stack([a(x).ravel() - (a(base).ravel() if with_base else 0) for x in xs])
    ww = w / w.sum() if normalize_weights else w
    norms = np.linalg.norm(vs, axis=1)
    units = vs / norms[:, None]
    mean = (ww[:, None] * units).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = sum(ww[i] * (units[i] - np.dot(units[i], mean) * mean) for i in range(3))
    step = np.linalg.norm(tangent)
    point = np.cos(step) * mean + np.sin(step) * tangent / step
    ref = (point * (ww * norms).sum()).reshape(SHAPE) + (a(base) if with_base else 0)
    out = run("multislerp", xs, base if with_base else None, weight=list(w),
              normalize_weights=normalize_weights)
    check(out, ref)


def test_multislerp_weights_summing_to_zero_is_rejected():
    xs, _ = inputs(2)
    with pytest.raises(MergeError, match="sum to 0"):
        run("multislerp", xs, None, weight=[1.0, -1.0])


def test_karcher_of_two_is_the_geodesic_midpoint_at_mean_norm():
    (x0, x1), _ = inputs(2)
    v0, v1 = a(x0).ravel(), a(x1).ravel()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    mid = v0 / n0 + v1 / n1
    ref = (mid / np.linalg.norm(mid) * (n0 + n1) / 2).reshape(SHAPE)
    check(run("karcher", [x0, x1], None), ref)


def test_karcher_mean_has_zero_mean_log_map():
    """The Karcher mean m of unit vectors u_i satisfies sum_i log_m(u_i) = 0."""
    xs, _ = inputs(4)
    out = a(run("karcher", xs, None, max_iter=50, tol=1e-9)).ravel()
    norms = [np.linalg.norm(a(x)) for x in xs]
    assert np.linalg.norm(out) == pytest.approx(np.mean(norms), rel=1e-5)
    m = out / np.linalg.norm(out)
    grad = np.zeros_like(m)
    for x in xs:
        u = a(x).ravel() / np.linalg.norm(a(x))
        cos = np.clip(np.dot(m, u), -1, 1)
        theta = np.arccos(cos)
        grad += theta / np.sin(theta) * (u - cos * m)
    assert np.linalg.norm(grad) < 1e-4


# ---------------------------------------------------------------- model stock, sce, passthrough
def stock_ref(w0: np.ndarray, ws: list[np.ndarray]) -> np.ndarray:
    offs = [w - w0 for w in ws]
    n = len(ws)
    cosines = [np.dot(offs[i], offs[j]) / (np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]))
               for i in range(n) for j in range(i + 1, n)]
    c = np.mean(cosines)
    t = n * c / (1 + (n - 1) * c)
    return t * np.mean(ws, axis=0) + (1 - t) * w0


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(filter_wise):
    xs, base = inputs()
    if filter_wise:
        ref = np.stack([stock_ref(a(base)[r], [a(x)[r] for x in xs]) for r in range(SHAPE[0])])
    else:
        ref = stock_ref(a(base).ravel(), [a(x).ravel() for x in xs]).reshape(SHAPE)
    check(run("model_stock", xs, base, filter_wise=filter_wise), ref)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce(select_topk):
    xs, base = inputs()
    deltas = np.stack([a(x) - a(base) for x in xs])
    if select_topk < 1:
        var = deltas.var(axis=0).ravel()
        k = int(select_topk * np.count_nonzero(var))
        keep = ranks(-var) < k  # the k highest variances
        deltas = deltas * keep.reshape(SHAPE)
    energy = np.array([(d ** 2).mean() for d in deltas])
    w = energy / energy.sum()
    mixed = np.zeros(SHAPE)
    for idx in np.ndindex(SHAPE):
        vals = deltas[(slice(None), *idx)]
        majority = 1.0 if vals.sum() >= 0 else -1.0  # elected on the unweighted deltas
        agree = np.sign(vals) == majority
        if agree.any():
            mixed[idx] = (w * vals)[agree].sum() / w[agree].sum()
    ref = a(base) + mixed
    check(run("sce", xs, base, select_topk=select_topk), ref)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_passthrough(scale):
    (x,), _ = inputs(1)
    out = run("passthrough", [x], None, scale=scale)
    check(out, a(x) * scale, tol=0)


# ---------------------------------------------------------------- arcee_fusion, nearswap, ram
def quartile_fence_ref(values: np.ndarray) -> float:
    """median + 1.5 IQR, quartile k = the sorted value at index floor(k (n - 1) / 4)."""
    s = np.sort(values.ravel())
    q = [s[int(np.floor(k * (s.size - 1) / 4))] for k in (1, 2, 3)]
    return q[1] + 1.5 * (q[2] - q[0])


def arcee_fusion_ref(other: np.ndarray, base: np.ndarray) -> np.ndarray:
    rows_o, rows_b = other.reshape(-1, other.shape[-1]), base.reshape(-1, base.shape[-1])
    kl = np.empty(len(rows_o))
    for i, (ro, rb) in enumerate(zip(rows_o, rows_b)):
        p = np.exp(ro - ro.max()) / np.exp(ro - ro.max()).sum() + 1e-8
        q = np.exp(rb - rb.max()) / np.exp(rb - rb.max()).sum() + 1e-8
        kl[i] = sum(pi * np.log(pi / qi) for pi, qi in zip(p, q))
    score = np.abs(other - base) * kl.reshape(*other.shape[:-1], 1)
    take = score >= quartile_fence_ref(score)
    return np.where(take, other, base)


@pytest.mark.parametrize("shape", [SHAPE, (7, 33), (40,)], ids=["matrix", "odd", "vector"])
def test_arcee_fusion(shape):
    (x,), base = inputs(1, shape, seed=4)
    x = x + torch.zeros(shape).index_fill_(-1, torch.tensor([2]), 3.0)  # a column of outliers
    ref = arcee_fusion_ref(a(x), a(base))
    assert 0 < (ref != a(base)).mean() < 0.5  # some entries taken, most kept
    check(run("arcee_fusion", [x], base), ref)


def test_arcee_fusion_takes_ties_at_the_fence_and_keeps_equal_inputs():
    base = torch.zeros(8)
    spike = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0])
    # importance 0 for seven entries: every quartile is 0, so is the fence, and 0 >= 0 takes all
    check(run("arcee_fusion", [spike], base), a(spike), tol=0)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    check(run("arcee_fusion", [x.clone()], x), a(x), tol=0)


def test_arcee_fusion_quartiles_are_exact_above_a_million_entries():
    """mergekit estimates them from a random sample there; ours are the exact order statistics."""
    from merge_engine.methods.arcee_fusion import importance, outlier_fence

    g = torch.Generator().manual_seed(5)
    base = torch.randn(1030, 1000, generator=g)
    x = base + 0.1 * torch.randn(1030, 1000, generator=g)
    scores = importance(x, base)
    assert scores.numel() > 1_000_000
    fence = float(outlier_fence(scores))
    assert fence == pytest.approx(quartile_fence_ref(a(scores)), rel=1e-6)
    check(run("arcee_fusion", [x], base), np.where(a(scores) >= fence, a(x), a(base)), tol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 1.0])
def test_nearswap(t):
    (x,), base = inputs(1, seed=6)
    xa, ba = a(x), a(base)
    ref = np.empty(SHAPE)
    for idx in np.ndindex(SHAPE):
        w = min(max(t / max(abs(ba[idx] - xa[idx]), 1e-6), 0.0), 1.0)
        ref[idx] = w * xa[idx] + (1 - w) * ba[idx]
    check(run("nearswap", [x], base, t=t), ref)


def test_nearswap_by_hand():
    base = torch.zeros(5)
    other = torch.tensor([0.05, 0.2, -0.5, 0.0, 0.1])
    # |diff| 0.05 < t: swapped; 0.2: halfway; 0.5: a fifth; 0 (equal): unchanged; 0.1 = t: swapped
    check(run("nearswap", [other], base, t=0.1), np.array([0.05, 0.1, -0.1, 0.0, 0.1]), tol=1e-7)
    check(run("nearswap", [other], base, t=0.0), np.zeros(5), tol=0)


def ram_ref(deltas: list[np.ndarray], epsilon: float, boosts: list[float] | None = None) -> np.ndarray:
    """Per entry: the mean of the changes larger than epsilon; a change only one model made,
    times that model's boost (RAM+)."""
    out = np.zeros(deltas[0].shape)
    for idx in np.ndindex(out.shape):
        made = [i for i, d in enumerate(deltas) if abs(d[idx]) > epsilon]
        if len(made) == 1:
            out[idx] = deltas[made[0]][idx] * (boosts[made[0]] if boosts else 1.0)
        elif made:
            out[idx] = sum(deltas[i][idx] for i in made) / len(made)
    return out


def boosts_ref(deltas: list[np.ndarray], epsilon: float, r: float, alpha: float) -> list[float]:
    made = [np.abs(d) > epsilon for d in deltas]
    count = sum(m.astype(int) for m in made)
    out = []
    for m in made:
        shared, unique = int((m & (count > 1)).sum()), int((m & (count == 1)).sum())
        rho = 0.0 if shared == 0 else shared / max(unique, epsilon)
        out.append(1 + r * min(max(rho, 0.0), alpha))
    return out


# base 2; epsilon 0.25; entries: m0 alone, a change equal to epsilon (not counted), no change,
# m0+m1, m0+m2, all three
RAM_DELTAS = [[0.5, 0.25, 0.0, 1.0, 0.5, -1.0],
              [0.0, 0.0, 0.0, 0.5, 0.0, 1.0],
              [0.0, 0.0, 0.0, 0.0, 0.75, 1.0]]


def test_ram_by_hand():
    base = torch.full((6,), 2.0)
    xs = [base + torch.tensor(d) for d in RAM_DELTAS]
    want = 2.0 + np.array([0.5, 0.0, 0.0, 0.75, 0.625, 1 / 3])
    check(run("ram", xs, base, epsilon=0.25), want, tol=1e-7)
    np.testing.assert_allclose(ram_ref([np.array(d) for d in RAM_DELTAS], 0.25) + 2.0, want)


def test_ramplus_tl_by_hand():
    base = torch.zeros(8)
    deltas = [[1, 1, 1, 1, 0.5, 0, 0, 0],  # 4 unique changes, 1 shared: rho 1/4, boost 1 + 0.5/4
              [0, 0, 0, 0, 1.5, 0.25, 0, 0],  # 0.25 = epsilon: no change
              [0, 0, 0, 0, 0, 0, 0, -1]]  # 1 unique, 0 shared: boost 1
    xs = [torch.tensor(d, dtype=torch.float32) for d in deltas]
    want = np.array([1.125] * 4 + [1.0, 0.0, 0.0, -1.0])
    check(run("ramplus_tl", xs, base, r=0.5, alpha=0.5, epsilon=0.25), want, tol=1e-7)
    # alpha caps rho: 1/4 -> 0.2 with the default alpha
    want[:4] = 1.1
    check(run("ramplus_tl", xs, base, r=0.5, epsilon=0.25), want, tol=1e-7)


@pytest.mark.parametrize("epsilon", [1e-5, 0.2])
def test_ram(epsilon):
    xs, base = inputs(3, seed=8)
    deltas = [a(x) - a(base) for x in xs]
    check(run("ram", xs, base, epsilon=epsilon), a(base) + ram_ref(deltas, epsilon))


@pytest.mark.parametrize("r,alpha,epsilon", [(0.1, 0.2, 1e-5), (0.5, 2.0, 0.3), (1.0, 12.0, 0.1),
                                             (2.0, 0.15, 0.5)])
def test_ramplus_tl(r, alpha, epsilon):
    xs, base = inputs(3, (8, 12), seed=9)
    deltas = [a(x) - a(base) for x in xs]
    boosts = boosts_ref(deltas, epsilon, r, alpha)
    assert len(set(boosts)) > 1 or epsilon == 1e-5  # rho differs by model (below the cap alpha)
    check(run("ramplus_tl", xs, base, r=r, alpha=alpha, epsilon=epsilon),
          a(base) + ram_ref(deltas, epsilon, boosts))


def test_ramplus_tl_model_that_changed_nothing_is_no_op_at_epsilon_zero():
    """mergekit divides 0 shared by 0 unique changes there (NaN everywhere); it adds nothing."""
    xs, base = inputs(2, seed=10)
    with_idle = run("ramplus_tl", [*xs, base.clone()], base, epsilon=0.0)
    assert torch.isfinite(with_idle).all()
    check(with_idle, a(run("ramplus_tl", xs, base, epsilon=0.0)), tol=0)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_with_identical_models_or_no_change_gives_base_plus_that_change(method):
    xs, base = inputs(1, seed=12)
    out = run(method, [xs[0], xs[0].clone(), base.clone()], base)
    check(out, a(xs[0]), tol=1e-6)  # two models share every change, the third made none


# ---------------------------------------------------------------- end to end on tiny checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fixtures import make_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_llama(root / "base", seed=0)
    return {"base": base, **{m: make_tiny_llama(root / m, seed=s, perturb_from=base)
                             for m, s in (("a", 1), ("b", 2))}}


@pytest.mark.parametrize("method,models,top", [
    ("arcee_fusion", ("a",), {}),
    ("nearswap", ("a",), {"t": 0.01}),
    ("ram", ("a", "b"), {"epsilon": 0.01}),
    ("ramplus_tl", ("a", "b"), {"epsilon": 0.01, "r": 0.5, "alpha": 1.0}),
])
def test_evomerge_merge_runs_each_new_method(tiny, tmp_path, method, models, top):
    """`evomerge merge` of a mergekit recipe: the file equals the method applied tensor by tensor,
    loads in transformers, and the in-memory apply gives the same bytes."""
    import yaml
    from transformers import AutoModelForCausalLM

    from evomerge.cli import main
    from fixtures import load_state
    from merge_engine.apply import InMemoryMerger
    from merge_engine.recipe import parse_recipe

    data = {"merge_method": method, "base_model": str(tiny["base"]), "dtype": "float32",
            "models": [{"model": str(tiny[m])} for m in models], "parameters": top}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out)]) == 0
    merged, base = load_state(out), load_state(tiny["base"])
    inputs_ = [load_state(tiny[m]) for m in models]
    changed = 0
    for name in merged:
        want = run(method, [s[name] for s in inputs_], base[name], **top)
        assert torch.equal(merged[name], want), name
        changed += not torch.equal(merged[name], base[name])
    assert changed > len(merged) // 2  # the merge really moved off the base
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    with InMemoryMerger(model) as merger:
        merger.apply(parse_recipe(data))
    for name, value in model.state_dict().items():
        assert torch.equal(value, merged[name]), name
