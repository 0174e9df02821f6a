"""A cheap fitness estimate: a candidate's full-set score predicted from a few anchor docs.

**Choosing anchors.** Each doc of a leaf task is described by its per-doc scores across the
models scored so far on the full set (the merge inputs and/or the first candidates). Docs are
clustered by that vector (k-means, seeded). Anchors are drawn at random within clusters, in
proportion to cluster size x spread (Neyman allocation): docs every scored model answers alike
get few anchors, docs that separate the models get more.

**Predicting.** A candidate is scored on the anchors only; every other doc gets a predicted score
and the task score is folded over all docs as usual (:meth:`AnchorEstimator.complete`):

- ``completion`` (default): the scored models' per-doc scores, each model weighted by how
  closely it agrees with the candidate on the anchors. A merge behaves much like a mixture of
  the models it is made of, so the docs it was not scored on are filled in from the models it
  resembles; this halves the absolute error of a plain random subset of the same size on the
  zoo (results/benchmarks/fidelity_estimator.md);
- ``stratified``: the mean of the candidate's anchors in the doc's cluster (the classic
  stratified estimator of the task mean; unbiased when anchors are random within clusters).

Why not IRT (mergenetic, tinyBenchmarks): an IRT model fits a difficulty and a discrimination per
doc, which needs many scored models (tinyBenchmarks fits on hundreds of leaderboard models). A
merge search has a handful (its inputs) plus its first candidates; clustering and agreement
weights use the same signal (which docs behave alike across models) without fitting per-doc
parameters those few models cannot identify, and with uninformative patterns the stratified
method degrades to a proportional random sample.

Contract: per-doc items are numbers (0/1 accuracy or any mean-aggregated metric); an estimate
is a mean over the task's docs, comparable with the full evaluation's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


DocScores = Mapping[str, Mapping[int, float]]  # leaf task -> doc id -> per-doc score
METHODS = ("completion", "stratified")


@dataclass(frozen=True)
class _Leaf:
    docs: tuple[int, ...]     # the leaf's docs in the full evaluation
    cluster: np.ndarray       # cluster index of each doc
    anchors: tuple[int, ...]  # anchor doc ids
    bank: np.ndarray          # docs x scored models: their per-doc scores


@dataclass(frozen=True)
class AnchorEstimator:
    """Anchor docs per leaf task and what predicts the other docs from them.

    ``complete(items)`` turns a candidate's scores on the anchors into a score for every doc of
    the full evaluation: the anchors keep theirs; another doc gets (``method``)

    - ``completion``: the scored models' scores on it, weighted by how closely each model
      agrees with the candidate on all anchors (a merge behaves like a mixture of known models);
    - ``stratified``: the mean of the candidate's anchors in its cluster (unbiased for the
      task mean when anchors are drawn at random within clusters).

    Folding the completed items (``TaskRunner.fold``) gives the estimated result.
    """

    leaves: dict[str, _Leaf]
    method: str = "completion"
    bandwidth: float = 0.05  # agreement gap (fraction of anchors) at which a model's weight falls by e

    @classmethod
    def fit(cls, scored: Sequence[DocScores], n_anchors: int, seed: int = 0,
            method: str = "completion") -> AnchorEstimator:
        """Choose ``n_anchors`` docs per leaf task from the per-doc scores of ``scored`` models
        (each scored on the same full doc set). Raises ``ValueError`` for no models, an unknown
        method, or leaves whose doc sets differ between models."""
        if not scored:
            raise ValueError("the anchor estimator needs the per-doc scores of at least one model")
        if n_anchors < 1:
            raise ValueError(f"n_anchors must be >= 1, got {n_anchors}")
        if method not in METHODS:
            raise ValueError(f"unknown estimator method {method!r}; use one of {', '.join(METHODS)}")
        leaves = {}
        for leaf in scored[0]:
            docs = sorted(scored[0][leaf])
            if any(sorted(s.get(leaf, {})) != docs for s in scored):
                raise ValueError(f"models were scored on different docs of {leaf}; score them on one doc set")
            if not docs:
                continue
            bank = np.array([[float(s[leaf][d]) for s in scored] for d in docs])
            cluster, chosen = _stratified_anchors(bank, n_anchors, np.random.default_rng([seed, len(docs)]))
            leaves[leaf] = _Leaf(tuple(docs), cluster, tuple(docs[i] for i in chosen), bank)
        return cls(leaves, method)

    def docs(self) -> dict[str, list[int]]:
        """The anchor docs to score (leaf task -> doc ids)."""
        return {leaf: sorted(v.anchors) for leaf, v in self.leaves.items()}

    @property
    def n_docs(self) -> int:
        return sum(len(v.anchors) for v in self.leaves.values())

    def complete(self, items: DocScores) -> dict[str, dict[int, float]]:
        """Every doc of the full evaluation: the candidate's own score where ``items`` has one
        (at least the anchors), a prediction elsewhere (see the class docstring)."""
        weights = self._model_weights(items) if self.method == "completion" else None
        out = {}
        for leaf, v in self.leaves.items():
            own = {d: float(x) for d, x in items[leaf].items()}
            if weights is not None:
                guess = v.bank @ weights
            else:
                # the mean of the anchors of the doc's cluster; a cluster without anchors (no
                # spread across the scored models) keeps the scored models' mean
                index = {d: i for i, d in enumerate(v.docs)}
                sums = np.zeros(v.cluster.max() + 1)
                counts = np.zeros_like(sums)
                for d in v.anchors:
                    sums[v.cluster[index[d]]] += own[d]
                    counts[v.cluster[index[d]]] += 1
                level = sums / np.maximum(counts, 1)
                guess = np.where(counts[v.cluster] > 0, level[v.cluster], v.bank.mean(axis=1))
            out[leaf] = {d: own.get(d, float(g)) for d, g in zip(v.docs, guess)}
        return out

    def _model_weights(self, items: DocScores) -> np.ndarray:
        """Softmax over the scored models of minus their disagreement with the candidate on the
        anchors (mean absolute difference), in units of ``bandwidth``."""
        gaps, n = 0.0, 0
        for leaf, v in self.leaves.items():
            index = {d: i for i, d in enumerate(v.docs)}
            rows = [index[d] for d in v.anchors]
            own = np.array([float(items[leaf][d]) for d in v.anchors])
            gaps = gaps + np.abs(v.bank[rows] - own[:, None]).sum(axis=0)
            n += len(rows)
        logits = -(gaps / max(n, 1)) / self.bandwidth
        w = np.exp(logits - logits.max())
        return w / w.sum()


def _stratified_anchors(patterns: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Cluster the rows of ``patterns`` (docs x models) and choose ``k`` anchor rows, drawn at
    random within each cluster. Anchors go to clusters in proportion to size x spread (Neyman
    allocation; the spread is the models' per-doc deviation from the docs' mean, plus the
    Bernoulli spread of that mean), by largest remainders. Returns (cluster of each row, chosen rows)."""
    n = len(patterns)
    labels, _ = _kmeans(patterns, min(k, len(np.unique(patterns, axis=0))), rng)
    _, labels = np.unique(labels, return_inverse=True)  # number the non-empty clusters 0..c-1
    if k >= n:
        return labels, list(range(n))
    clusters = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    mean = patterns.mean(axis=1)
    spread = np.array([np.sqrt(np.mean((patterns[m] - mean[m, None]) ** 2)
                               + np.mean(mean[m] * (1 - np.clip(mean[m], 0, 1))) + 1e-3) for m in clusters])
    sizes = np.array([len(m) for m in clusters], dtype=float)
    share = sizes * spread / (sizes * spread).sum() * k
    count = np.minimum(np.floor(share), sizes).astype(int)
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if count.sum() >= k:
            break
        if count[i] < sizes[i]:
            count[i] += 1
    chosen = [int(i) for members, m in zip(clusters, count) for i in rng.choice(members, int(m), replace=False)]
    return labels, sorted(chosen)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; returns (labels, centres)."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([np.sum((x - c) ** 2, axis=1) for c in centres], axis=0)
        if d2.sum() == 0:
            break
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    c = np.array(centres)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(axis=2), axis=1)
        new = np.array([x[labels == j].mean(axis=0) if (labels == j).any() else c[j] for j in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    return labels, c
