"""Apply recipes to a resident model in place: no disk, source tensors cached across calls.

The search keeps one model in memory and, for each candidate, overwrites its
parameters with the merged tensors. The result equals, bit for bit, loading the
on-disk merge of the same recipe into a model of the same dtype.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from merge_engine.devices import SourceHome, free_memory, source_home
from merge_engine.dtypes import torch_dtype
from merge_engine.errors import RecipeError
from merge_engine.graph import Executor
from merge_engine.io.refs import ModelRef
from merge_engine.plan import LoadTensor, MergeContext, MergeTensor, output_shape_dtype
from merge_engine.recipe import MergeRecipe
from merge_engine.task_vectors import TaskVectorCache, caching

DEFAULT_TASK_VECTOR_CACHE_BYTES = 4 << 30  # deltas are as large as their sources (bf16)


@dataclass
class ApplyStats:
    recomputed: int
    unchanged: int
    seconds: float


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``; between contiguous CPU tensors of one dtype and shape a plain
    memmove, because torch's parallel copy wakes its OpenMP team, whose workers then spin while
    the next tensor's native kernels need the cores (38 % of a TIES candidate's busy time on 2
    cores). Under ``no_grad``; the parameter's autograd version counter is not bumped (no graph
    holds the resident model's parameters during a search)."""
    if (target.device.type == value.device.type == "cpu" and target.dtype == value.dtype
            and target.shape == value.shape and target.is_contiguous() and value.is_contiguous()):
        if target.data_ptr() != value.data_ptr():
            ctypes.memmove(target.data_ptr(), value.data_ptr(), value.numel() * value.element_size())
    else:
        target.copy_(value)


class InMemoryMerger:
    """Writes merged tensors into ``model``'s parameters.

    Lifecycle: construct once with the resident model (its architecture must
    match the recipes' output); call :meth:`apply` once per candidate recipe —
    only tensors whose node changed since the last call are recomputed, and
    source tensors are read once and kept (``cache_sources``); :meth:`close`
    releases the readers and the cache.

    On a GPU the cached sources live on the GPU when they fit in a share of its free memory
    (``sources_on_device=None``, decided at the first apply), else in pinned host memory and are
    copied asynchronously per recomputed tensor; True/False forces either (see
    :func:`merge_engine.devices.source_home`). The bits are the same either way.

    Work that does not depend on a candidate's parameters (each source's task vector and the
    histogram of its magnitudes, from which any density's top-k is read) is kept for the whole
    search in ``self.task_vectors`` (:class:`merge_engine.task_vectors.TaskVectorCache`), up to
    ``task_vector_cache_bytes`` (0 turns it off; past the cap it is recomputed per candidate);
    :meth:`cache_report` says what is held. It serves the bf16 CPU fast path of the sparsifying
    methods and needs ``cache_sources`` (its entries are keyed by the cached source tensors).
    """

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device | None = None,
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 cache_sources: bool = True, sources_on_device: bool | None = None,
                 task_vector_cache_bytes: int = DEFAULT_TASK_VECTOR_CACHE_BYTES,
                 lora_merge_dtype: str | None = None,
                 targets: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.lora_merge_dtype = lora_merge_dtype  # as prepare() takes it: base+adapter models' merge dtype
        # the tensor written for each state-dict name: the model's own, unless the caller knows
        # better (an offloaded parameter's store); reassigned when the model's layers change
        self.targets = dict(targets if targets is not None else model.state_dict(keep_vars=True))
        first = next(iter(model.parameters()))
        self.device = torch.device(device) if device is not None else first.device
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self.cache_sources = cache_sources
        self.sources_on_device = sources_on_device
        self.source_home: SourceHome | None = None  # decided at the first apply
        self._stack = ExitStack()
        self._readers: dict[ModelRef, object] = {}
        self._sources: dict[LoadTensor, torch.Tensor] = {}
        self._applied: dict[str, MergeTensor] = {}
        self.task_vectors = TaskVectorCache(task_vector_cache_bytes if cache_sources else 0)
        self._lent: set[ModelRef] = set()  # readers handed in by apply(readers=...), not ours to close

    def plan(self, recipe: MergeRecipe):
        """Check and plan ``recipe`` against this model (raises RecipeError listing every problem).

        One pass of :func:`merge_engine.session.prepare`: the recipe is checked once and planned
        once. Models seen for the first time are opened into this merger's own stack (headers
        are parsed once per model for the whole search) and compared with the others; later
        recipes over the same models reuse those readers.
        """
        from merge_engine.session import prepare

        plan = prepare(recipe, self._stack, opened=self._readers, allow_pickle=self.allow_pickle,
                       trust_remote_code=self.trust_remote_code, lora_merge_dtype=self.lora_merge_dtype).plan
        problems = []
        for node in plan.targets:
            target = self.targets.get(node.out_name)
            if target is None:
                problems.append(f"the resident model has no parameter {node.out_name}; "
                                "in-memory apply needs a model of the recipe's output architecture")
            else:
                shape, _ = output_shape_dtype(node, self._readers)
                if tuple(target.shape) != tuple(shape):
                    problems.append(f"parameter {node.out_name} has shape {list(target.shape)} in the "
                                    f"resident model but {list(shape)} in the merge")
        if problems:
            raise RecipeError(problems[:5])
        return plan

    def apply(self, recipe: MergeRecipe, readers: dict[ModelRef, object] | None = None) -> ApplyStats:
        """Merge ``recipe`` into the model's parameters in place. ``readers`` (e.g. a
        StagePipeline's in-memory stage outputs) are used for those refs instead of opening them;
        readers lent at an earlier call and not lent now are forgotten with their cached tensors."""
        import time

        start = time.perf_counter()
        if readers is not None:
            stale = self._lent - set(readers)
            self._sources = {k: v for k, v in self._sources.items() if k.model not in stale}
            for ref in stale:
                self._readers.pop(ref, None)
            self._readers.update(readers)
            self._lent = set(readers)
        plan = self.plan(recipe)
        self._untie_written_aliases([n.out_name for n in plan.targets])
        todo = [n for n in plan.targets if self._applied.get(n.out_name) != n]
        if self.source_home is None:
            # not cached: each source is read once and moved once, so plain memory (pinning it
            # would cost more than the one copy saves)
            self.source_home = "cpu" if not self.cache_sources else source_home(
                self.device, self._source_bytes(plan), free_memory(self.device), self.sources_on_device)
        ctx = MergeContext(self._readers, self.device, source_home=self.source_home)
        cached = self._sources.get if self.cache_sources else None

        def remember(node, value):
            if self.cache_sources and isinstance(node, LoadTensor):
                self._sources[node] = value

        executor = Executor(todo, ctx, cached=cached, on_computed=remember)
        with torch.no_grad(), caching(self.task_vectors if self.task_vectors.cap_bytes else None):
            for node, value in executor.run():
                _write(self.targets[node.out_name], value)
                self._applied[node.out_name] = node
        return ApplyStats(len(todo), len(plan.targets) - len(todo), time.perf_counter() - start)

    def cache_report(self) -> dict[str, object]:
        """What the per-run task-vector cache holds: ``bytes``, ``cap_bytes``, ``bytes_by_model``
        (by the model's position among the merged, non-base models), ``hits``, ``misses`` and
        ``refused`` (entries not kept because of the cap)."""
        c = self.task_vectors
        return {"bytes": c.bytes, "cap_bytes": c.cap_bytes, "bytes_by_model": c.bytes_by_model(),
                "hits": c.hits, "misses": c.misses, "refused": c.refused}

    def _source_bytes(self, plan) -> int:
        """Bytes of every distinct source tensor ``plan`` reads, once cast."""
        total = 0
        for load in {load for node in plan.targets for load in node.loads()}:
            reader = self._readers[load.model]
            shape = load.crop or tuple(reader.shape(load.name))
            dtype = torch_dtype(load.dtype) if load.dtype else reader.dtype(load.name)
            total += math.prod(shape) * dtype.itemsize
        return total

    def _untie_written_aliases(self, written: list[str]) -> None:
        """Give each written name its own parameter when the model shares one between them.

        A model whose config ties the embeddings holds ``embed_tokens`` and ``lm_head`` as one
        parameter. When the merge writes both (the sources store both), the disk merge keeps two
        tensors and transformers reloads them untied if they differ; writing both into one shared
        parameter would keep only the last. Untying once (a copy of the shared tensor; the config
        then says ``tie_word_embeddings: False`` so a save keeps both) makes the in-memory model
        equal the reloaded disk merge; untied equal values compute the same as tied ones.
        """
        seen: dict[int, str] = {}
        for name in written:
            target = self.targets.get(name)
            if target is None:
                continue
            if id(target) not in seen:
                seen[id(target)] = name
                continue
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner)
            own = torch.nn.Parameter(target.detach().clone(), requires_grad=target.requires_grad)
            setattr(module, attr, own)
            self.targets[name] = own
            config = getattr(self.model, "config", None)
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False

    def forget(self) -> None:
        """Drop the record of applied nodes (the next apply rewrites every tensor)."""
        self._applied.clear()

    def close(self) -> None:
        self.task_vectors.clear()
        self._sources.clear()
        self._applied.clear()
        self._stack.close()
        self._readers.clear()

    def __enter__(self) -> InMemoryMerger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
