"""HF backend: lm-eval's ``HFLM`` wrapped around the resident ``nn.Module`` (no save/reload)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.evaluate.base import Evaluator
from evomerge.evaluate.config import EvalConfig
from evomerge.evaluate.result import EvalResult

if TYPE_CHECKING:
    from evomerge.evaluate.catalog import TaskCatalog


class HFEvaluator(Evaluator):
    """Evaluates the in-memory model with lm-eval's ``HFLM``.

    The ``HFLM`` wrapper is kept while the same model and tokenizer objects come back, so a
    candidate costs only the forward passes plus lm-eval's request building; weights changed in
    place are seen by the next ``evaluate``. ``model`` may also be a model directory (loaded here).
    """

    def __init__(
        self, cfg: EvalConfig, *, device: str = "cpu", catalog: TaskCatalog | None = None
    ) -> None:
        super().__init__(cfg, catalog)
        self.device = device
        self._lm: Any = None
        self._lm_key: tuple[int, int] | None = None

    def evaluate(self, model: Any, tokenizer: Any = None) -> EvalResult:
        if isinstance(model, (str, Path)):
            model, tokenizer = load_model_dir(model, dtype=self.cfg.dtype, device=self.device)
        if tokenizer is None:
            raise ValueError("HFEvaluator.evaluate needs the tokenizer when given a model object")
        return self.runner.run(self._wrap(model, tokenizer))

    def close(self) -> None:
        self._lm = self._lm_key = None

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        key = (id(model), id(tokenizer))
        if self._lm is None or self._lm_key != key:
            self._lm = _resident_hflm_class()(
                pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size)
            self._lm_key = key
        return self._lm


_RESIDENT_HFLM: type | None = None


def _resident_hflm_class() -> type:
    """lm-eval's ``HFLM`` that remembers its tokenizations (built on first use: lm_eval is heavy).

    Prompts and continuations are the same for every candidate and the tokenizer never changes
    while the wrapper lives, so each string is encoded once per run instead of once per
    candidate (on the demo zoo that was ~0.5 s of a ~2.5 s trial); ``max_length`` is read once.
    """
    global _RESIDENT_HFLM
    if _RESIDENT_HFLM is None:
        from lm_eval.models.huggingface import HFLM

        class ResidentHFLM(HFLM):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
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


def load_model_dir(path: str | Path, *, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a saved model")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


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
