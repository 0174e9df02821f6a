"""The fast path of the task-arithmetic family: native bf16 kernels plus a per-run cache.

``merge_trimmed`` computes exactly what ``sparsify.merge_task_vectors`` computes (the reference,
used for anything the kernels do not cover: other dtypes, GPUs, small tensors, no C compiler) in
a few passes with no float32 copies of whole tensors:

1. per model, ``delta = x - base`` in bf16 and a histogram of its magnitude bits (or both from
   the run's :class:`TaskVectorCache`: they do not depend on the candidate's parameters);
2. a rank selection (:mod:`merge_engine.selection`) read off the histogram for any density:
   top-k (TIES), a band (breadcrumbs), or none (DARE/DELLA trim in torch, as before);
3. one fused pass (``native.sparse.sparse_mix``) that applies the selections, weights, elects
   signs and adds the mix to the base.

SCE (:func:`merge_sce`) shares step 1, selects by the variance across models (a native pass, then
the same histogram selection) and mixes in its own fused pass (``native.sparse.sce_mix``).

Lifecycle of the cache: an ``InMemoryMerger`` owns one for its whole search and makes it current
with :func:`caching` around each apply; entries are keyed by the source tensor objects the merger
keeps (an entry dies with its tensor) and nothing is cached once ``cap_bytes`` is reached (the
work is then recomputed per candidate).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from merge_engine import native
from merge_engine.native import l1 as native_l1
from merge_engine.native import sparse as native_sparse
from merge_engine.methods._reduce import total
from merge_engine.selection import Histogram, Select, top_k
from merge_engine.sparsify import Trim, merge_task_vectors, rescale_l1


@dataclass
class DeltaStats:
    """``x - base`` (flat bf16) and the histogram of its magnitudes (None until a method that
    selects by rank asks for it); independent of any candidate."""

    delta: torch.Tensor
    hist: Histogram | None

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size() + (self.hist.nbytes if self.hist else 0)


class TaskVectorCache:
    """Per-run :class:`DeltaStats` of (source tensor, base tensor) pairs, capped at ``cap_bytes``.

    ``bytes_by_model`` reports what is held per model index (the position of the source in the
    recipes' model lists); ``hits``/``misses``/``refused`` count lookups and entries not kept
    because of the cap.
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = int(cap_bytes)
        self._entries: dict[tuple[int, int], tuple[DeltaStats, int]] = {}
        self.bytes = 0
        self.hits = self.misses = self.refused = 0

    def get(self, x: torch.Tensor, base: torch.Tensor) -> DeltaStats | None:
        entry = self._entries.get((id(x), id(base)))
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def put(self, x: torch.Tensor, base: torch.Tensor, stats: DeltaStats, model_index: int) -> None:
        if self.bytes + stats.nbytes > self.cap_bytes:
            self.refused += 1
            return
        key = (id(x), id(base))
        self._entries[key] = (stats, model_index)
        self.bytes += stats.nbytes
        # the entry lives as long as both tensors (ids are reused after a tensor is freed)
        for t in (x, base):
            weakref.finalize(t, self._drop, key)

    def grew(self, stats: DeltaStats) -> None:
        """Count the histogram just added to a held entry (held past the cap: it is small)."""
        self.bytes += stats.hist.nbytes

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[0].nbytes

    def bytes_by_model(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for stats, index in self._entries.values():
            out[index] = out.get(index, 0) + stats.nbytes
        return out

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


_current: contextvars.ContextVar[TaskVectorCache | None] = contextvars.ContextVar(
    "evomerge_task_vector_cache", default=None)


@contextlib.contextmanager
def caching(cache: TaskVectorCache | None) -> Iterator[None]:
    """Make ``cache`` the one ``merge_trimmed`` uses on this thread while the block runs."""
    token = _current.set(cache)
    try:
        yield
    finally:
        _current.reset(token)


def _stats(x: torch.Tensor, base: torch.Tensor, index: int, cache: TaskVectorCache | None,
           hist: bool = True) -> DeltaStats:
    """Keyed by the tensor objects the caller was handed (the merger's cached sources), not views.
    ``hist``: the histogram is needed (a cached entry without one gets it added)."""
    stats = cache.get(x, base) if cache is not None else None
    if stats is None:
        if hist:
            delta, counts = native_sparse.delta_and_histogram(x.reshape(-1), base.reshape(-1))
            stats = DeltaStats(delta, Histogram.from_counts(counts))
        else:  # DARE, DELLA and SCE read no histogram: one pass less over every delta
            stats = DeltaStats(native_sparse.delta_only(x.reshape(-1), base.reshape(-1)), None)
        if cache is not None:
            cache.put(x, base, stats, index)
    elif hist and stats.hist is None:
        stats.hist = Histogram.from_counts(native_sparse.histogram(stats.delta))
        if cache is not None:
            cache.grew(stats)
    return stats


def merge_trimmed(tensors: Sequence[torch.Tensor], base: torch.Tensor, weight: Sequence[float], *,
                  normalize: bool, lambda_: float, elect_signs: bool, trim: Trim,
                  select: Select | None = None, rescale: bool = False) -> torch.Tensor:
    """``sparsify.merge_task_vectors(..., trim=trim)``, the same bits, on the fast path when it applies.

    ``select(i, delta, hist)`` (optional) gives model ``i``'s rank selection
    (:mod:`merge_engine.selection`), which must keep the entries ``trim`` keeps; with ``rescale``
    the kept entries are then rescaled as ``trim`` does (``sparsify.rescale_l1``). Without
    ``select`` the trim runs in torch on the delta and only the mixing is fused.
    """
    if not tensors or base is None or not native_sparse.usable(base, *tensors):
        return merge_task_vectors(tensors, base, weight, normalize=normalize, lambda_=lambda_,
                                  elect_signs=elect_signs, trim=trim)
    cache = _current.get()
    flat_base = base.reshape(-1)
    deltas, selections, sources = [], [], []
    for i, x in enumerate(tensors):
        stats = _stats(x, base, i, cache, hist=select is not None)
        sources.append(stats.delta)
        chosen = select(i, stats.delta, stats.hist) if select is not None else None
        if chosen is None:
            kept = trim(i, stats.delta.view(base.shape)).reshape(-1)
            chosen = (native_sparse.KEEP_ALL, 0, 0, 0, 0)
        elif rescale and chosen[0] not in (native_sparse.KEEP_ALL, native_sparse.KEEP_ZERO):
            kept = rescale_l1(stats.delta, native_sparse.select(stats.delta, chosen)).contiguous()
            chosen = (native_sparse.KEEP_ALL, 0, 0, 0, 0)
        else:
            kept = stats.delta
        deltas.append(kept if kept.dtype == torch.bfloat16 else kept.to(torch.bfloat16))
        selections.append(chosen)
    w = torch.tensor(list(weight), dtype=torch.bfloat16)
    divisor = w.sum(dim=0)
    divisor = 1.0 if abs(float(divisor)) < 1e-8 else float(divisor)
    out = native_sparse.sparse_mix(deltas, selections, flat_base, [float(v) for v in w],
                                   elect=elect_signs, normalize=normalize, divisor=divisor,
                                   lambda_=lambda_)
    _recycle(deltas + (sources if cache is None else []), keep=sources if cache is not None else [])
    return out.view(base.shape)


def _recycle(dead: list[torch.Tensor], keep: list[torch.Tensor]) -> None:
    """Give the scratch buffers of a finished mix back (:func:`merge_engine.native.recycle`): each
    buffer once, none that a search cache still holds (``keep``)."""
    held = {t.untyped_storage().data_ptr() for t in keep}
    for t in dead:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            held.add(ptr)
            native.recycle(t)


def merge_sce(tensors: Sequence[torch.Tensor], base: torch.Tensor,
              select_topk: float) -> torch.Tensor | None:
    """``methods.sce.sce`` on the fast path, the same bits; None where the kernels do not apply."""
    if not tensors or not native_sparse.usable(base, *tensors):
        return None
    cache = _current.get()
    deltas = [_stats(x, base, i, cache, hist=False).delta for i, x in enumerate(tensors)]
    var, chosen = None, None
    if select_topk < 1:
        var = native_sparse.variance(deltas)
        hist = Histogram.from_counts(native_sparse.histogram(var))
        zeros = int(hist.counts[0]) if int(hist.keys[0]) == 0 else 0  # var >= 0: no -0.0
        chosen = top_k(var, hist, int(abs(select_topk) * (var.numel() - zeros)))
        if chosen[0] == native_sparse.KEEP_ALL:
            var = None
    if native_l1.usable(base):
        # the energies of the masked deltas, the mask read off var's bits inside the pass
        top = (chosen[1], chosen[2]) if var is not None else (0, 0)
        energy = [float(native_l1.total(d, None, square=True, var=var, top=top)) / d.numel()
                  for d in deltas]
        shares = _shares(energy)
    else:
        kept = deltas
        if var is not None:  # the energies are of the masked deltas (the mask reads var's bits)
            keys, lo, lo_cut = var.view(torch.int16), chosen[1], chosen[2]
            mask = keys > lo
            mask[:lo_cut + 1] |= keys[:lo_cut + 1] == lo
            kept = [d * mask for d in deltas]
        shares = energy_shares(kept)
    if not all(math.isfinite(v) for v in shares):  # inf/NaN deltas: torch's NaN payloads decide
        return None
    weights = [float(v) for v in torch.tensor(shares, dtype=torch.bfloat16)]
    out = native_sparse.sce_mix(deltas, base.reshape(-1), var, chosen or (0, 0, 0), weights)
    _recycle(([var] if var is not None else []) + (deltas if cache is None else []), keep=[])
    return out.view(base.shape)


def energy_shares(deltas: Sequence[torch.Tensor]) -> list[float]:
    """SCE's model weights: each delta's ``mean(delta**2)`` over their sum (equal when ~0)."""
    return _shares([float(total(d.float() ** 2)) / d.numel() for d in deltas])


def _shares(energy: list[float]) -> list[float]:
    energy_sum = sum(energy)
    return [1.0 / len(energy)] * len(energy) if energy_sum < 1e-6 else [e / energy_sum for e in energy]
