"""Rank selections of a bf16 delta read off a histogram of its magnitudes, for any density.

The 15 magnitude bits of a bf16 value rank like its absolute value, so a histogram over them
(kept compressed: the magnitudes that occur and their counts) tells, for any ``k``, the
magnitude of the k-th largest entry and how many lie above it. Ties of equal magnitude are
broken by position, as the stable sorts of the reference trims (``sparsify``) break them: the
selection then names the flat index up to which (or from which) the tied entries are kept, found
by one scan (``native.sparse.nth_with_key``), skipped when all or none of the tied ones are kept.

A selection is ``(mode, lo, lo_cut, hi, hi_cut)`` for ``native.sparse.sparse_mix``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from merge_engine.native import sparse as native_sparse

Selection = tuple[int, int, int, int, int]
Select = Callable[[int, torch.Tensor, "Histogram"], "Selection | None"]

ALL: Selection = (native_sparse.KEEP_ALL, 0, 0, 0, 0)
ZERO: Selection = (native_sparse.KEEP_ZERO, 0, 0, 0, 0)  # zeros_like: +0.0 everywhere
NONE: Selection = (native_sparse.KEEP_TOP, native_sparse.KEYS, -1, 0, 0)  # delta * False


@dataclass(frozen=True)
class Histogram:
    """Magnitudes that occur (``keys``, ascending int64) and how many entries have each."""

    keys: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> Histogram:
        keys = torch.nonzero(counts).reshape(-1)
        return cls(keys, counts[keys])

    @property
    def nbytes(self) -> int:
        return (self.keys.numel() + self.counts.numel()) * 8

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def rank_from_bottom(self, r: int) -> tuple[int, int, int]:
        """For 0-based ascending rank ``r``: its magnitude, how many lie below it, how many equal it."""
        cum = self.counts.cumsum(0)
        j = int(torch.searchsorted(cum, r, right=True))
        below = int(cum[j - 1]) if j else 0
        return int(self.keys[j]), below, int(self.counts[j])


def _cut(delta: torch.Tensor, key: int, nth: int, equal: int, *, all_at: int) -> int:
    """Index of the ``nth`` tied entry of magnitude ``key`` (``all_at`` when that is the last one)."""
    return all_at if nth == equal else native_sparse.nth_with_key(delta, key, nth)


def top_k(delta: torch.Tensor, hist: Histogram, k: int) -> Selection:
    """The ``k`` largest magnitudes, ties to the lower index (``sparsify.top_k_mask``)."""
    n = delta.numel()
    if k >= n:
        return ALL
    if k <= 0:
        return NONE
    key, below, equal = hist.rank_from_bottom(n - k)  # the k-th largest is ascending rank n - k
    above = n - below - equal
    return (native_sparse.KEEP_TOP, key, _cut(delta, key, k - above, equal, all_at=n), 0, 0)


def band(delta: torch.Tensor, hist: Histogram, first: int, stop: int) -> Selection:
    """Ascending ranks ``first <= r < stop`` of a stable ascending sort by magnitude."""
    n = delta.numel()
    if first >= stop:
        return NONE
    lo, below, equal = hist.rank_from_bottom(first)
    lo_cut = 0 if first == below else native_sparse.nth_with_key(delta, lo, first - below + 1)
    hi, below, equal = hist.rank_from_bottom(stop - 1)
    hi_cut = _cut(delta, hi, stop - below, equal, all_at=n)
    return (native_sparse.KEEP_BAND, lo, lo_cut, hi, hi_cut)


def magnitude(density: Sequence[float]) -> Select:
    """``sparsify.magnitude_trim``'s selection for per-model ``density``."""
    def select(i: int, delta: torch.Tensor, hist: Histogram) -> Selection:
        d = density[i]
        if d >= 1:
            return ALL
        if d <= 0:
            return ZERO
        return top_k(delta, hist, max(1, int(d * delta.numel())))
    return select


def breadcrumbs(density: Sequence[float], gamma: Sequence[float]) -> Select:
    """``sparsify.breadcrumbs_trim``'s selection for per-model ``density`` and ``gamma``."""
    def select(i: int, delta: torch.Tensor, hist: Histogram) -> Selection:
        if density[i] >= 1:
            return ALL
        n = delta.numel()
        n_keep, n_top = int(density[i] * n), int(gamma[i] * n)
        n_bot = n - n_keep - n_top
        if n_bot < 0:
            n_top += n_bot
            n_bot = 0
        return band(delta, hist, n_bot, n - n_top)
    return select
