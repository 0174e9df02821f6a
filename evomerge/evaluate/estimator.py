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
from typing import Any

import numpy as np

from evomerge.evaluate.result import TaskScore, weighted_score

DocScores = Mapping[str, Mapping[int, float]]  # leaf task -> doc id -> per-doc score


@dataclass(frozen=True)
class AnchorEstimator:
    """Anchor docs and their weights per leaf task (weights of a leaf sum to 1)."""

    anchors: dict[str, tuple[int, ...]]
    weights: dict[str, tuple[float, ...]]

    @classmethod
    def fit(cls, scored: Sequence[DocScores], n_anchors: int, seed: int = 0) -> AnchorEstimator:
        """Choose ``n_anchors`` docs per leaf task from the per-doc scores of ``scored`` models
        (each scored on the same full doc set). Raises ``ValueError`` for no models or leaves
        whose doc sets differ between models."""
        if not scored:
            raise ValueError("the anchor estimator needs the per-doc scores of at least one model")
        if n_anchors < 1:
            raise ValueError(f"n_anchors must be >= 1, got {n_anchors}")
        anchors, weights = {}, {}
        for leaf in scored[0]:
            docs = sorted(scored[0][leaf])
            if any(sorted(s.get(leaf, {})) != docs for s in scored):
                raise ValueError(f"models were scored on different docs of {leaf}; score them on one doc set")
            if not docs:
                continue
            patterns = np.array([[float(s[leaf][d]) for s in scored] for d in docs])
            chosen, w = _stratified_anchors(patterns, n_anchors, np.random.default_rng([seed, len(docs)]))
            anchors[leaf] = tuple(docs[i] for i in chosen)
            weights[leaf] = tuple(w)
        return cls(anchors, weights)

    def docs(self) -> dict[str, list[int]]:
        """The anchor docs to score (leaf task -> doc ids)."""
        return {leaf: sorted(ids) for leaf, ids in self.anchors.items()}

    @property
    def n_docs(self) -> int:
        return sum(len(a) for a in self.anchors.values())

    def leaf_estimates(self, items: DocScores) -> dict[str, float]:
        """Each leaf's estimated full-set mean from its anchors' scores in ``items``."""
        return {leaf: float(sum(w * float(items[leaf][d]) for d, w in zip(ids, self.weights[leaf])))
                for leaf, ids in self.anchors.items()}

    def estimate(self, items: DocScores, tasks: Sequence[Any], leaves: Mapping[str, Sequence[str]],
                 sizes: Mapping[str, int]) -> tuple[float, tuple[TaskScore, ...]]:
        """The estimated weighted score and task scores. ``tasks``: the eval's ``TaskSpec``s
        with their metric keys as ``(spec, metric)`` pairs; ``leaves``: each task's leaves;
        ``sizes``: each leaf's number of docs in the full evaluation (a group's leaves weigh by it)."""
        per_leaf = self.leaf_estimates(items)
        scores = []
        for spec, metric in tasks:
            members = [leaf for leaf in leaves[spec.name] if leaf in per_leaf]
            total = sum(sizes[leaf] for leaf in members)
            value = sum(per_leaf[leaf] * sizes[leaf] for leaf in members) / total if total else float("nan")
            scores.append(TaskScore(spec.name, metric, value, spec.weight,
                                    n_samples=sum(len(self.anchors[leaf]) for leaf in members)))
        return weighted_score(scores), tuple(scores)


def _stratified_anchors(patterns: np.ndarray, k: int, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """Indices of ``k`` anchor rows of ``patterns`` (docs × models) and their weights."""
    n = len(patterns)
    if k >= n:
        return list(range(n)), [1.0 / n] * n
    labels, centres = _kmeans(patterns, min(k, len(np.unique(patterns, axis=0))), rng)
    clusters = [(np.flatnonzero(labels == c), centre) for c, centre in enumerate(centres)]
    clusters = [(members, centre) for members, centre in clusters if len(members)]
    # anchors per cluster: proportional to its size (largest remainders), at least one each
    share = np.array([len(members) for members, _ in clusters], dtype=float) * k / n
    count = np.maximum(1, np.floor(share)).astype(int)
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if count.sum() >= k:
            break
        count[i] += 1
    while count.sum() > k:  # the "at least one" of small clusters overshot: take from the largest
        count[int(np.argmax(count))] -= 1
    chosen, weights = [], []
    for (members, centre), m in zip(clusters, count):
        m = min(int(m), len(members))
        # the docs nearest the centre stand for the cluster (ties broken at random, seeded)
        dist = np.linalg.norm(patterns[members] - centre, axis=1) + rng.random(len(members)) * 1e-9
        for i in members[np.argsort(dist, kind="stable")[:m]]:
            chosen.append(int(i))
            weights.append(len(members) / n / m)
    return chosen, weights


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
