"""A cheap fitness estimate: a candidate's full-set score predicted from a few anchor docs.

Method: **stratified anchors on correctness patterns.** Each doc of a leaf task is described by
its per-doc scores across the models scored so far on the full set (the merge inputs, then early
candidates). Docs are clustered by that vector (k-means, seeded); each cluster gets anchors in
proportion to its size, the docs nearest its centre; an anchor's weight is the share of the
task's docs it stands for. A candidate's task score is estimated as the weighted sum of its
anchor scores, and the full score by the tasks' own weights (:func:`weighted_score`).

Why this and not IRT (mergenetic, tinyBenchmarks): an IRT model fits a difficulty and a
discrimination per doc, which needs many scored models (tinyBenchmarks fits on hundreds of
leaderboard models). A merge search has a handful (its inputs) plus its first candidates. With
few models the clustering uses the same signal (which docs behave alike across models) without
fitting parameters it cannot identify; with uninformative patterns it degrades to proportional
stratified sampling, which is unbiased for the task mean. Docs that every model answers alike form
one large cluster and get few anchors; docs that separate the models get more.

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
                index = {d: i for i, d in enumerate(v.docs)}
                sums = np.zeros(v.cluster.max() + 1)
                counts = np.zeros_like(sums)
                for d in v.anchors:
                    sums[v.cluster[index[d]]] += own[d]
                    counts[v.cluster[index[d]]] += 1
                guess = (sums / np.maximum(counts, 1))[v.cluster]
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
    """Cluster the rows of ``patterns`` (docs x models) and choose ``k`` anchor rows: per
    cluster in proportion to its size (largest remainders, at least one each), drawn at random
    within it. Returns (cluster of each row, chosen rows)."""
    n = len(patterns)
    labels, _ = _kmeans(patterns, min(k, len(np.unique(patterns, axis=0))), rng)
    _, labels = np.unique(labels, return_inverse=True)  # number the non-empty clusters 0..c-1
    if k >= n:
        return labels, list(range(n))
    clusters = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    share = np.array([len(m) for m in clusters], dtype=float) * k / n
    count = np.maximum(1, np.floor(share)).astype(int)
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if count.sum() >= k:
            break
        count[i] += 1
    while count.sum() > k:  # the "at least one" of small clusters overshot: take from the largest
        count[int(np.argmax(count))] -= 1
    chosen = [int(i) for members, m in zip(clusters, count)
              for i in rng.choice(members, min(int(m), len(members)), replace=False)]
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
