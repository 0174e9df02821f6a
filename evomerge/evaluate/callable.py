"""Scoring a candidate with something other than lm-eval: a user's Python callable, and the
tokens the model generated during an evaluation.

A callable objective is named ``module:function`` in a space's ``objectives`` (see
:mod:`evomerge.space.objectives`). Its contract::

    def my_score(model, tokenizer) -> float | dict[str, float]:
        ...   # model: the candidate (a transformers causal LM, eval mode, on the search device,
              # weights of this trial written in place); tokenizer: its tokenizer.
              # Called under torch.no_grad(), once per candidate, after the lm-eval evaluation.
              # It must not keep or modify the model: the next candidate is written into it.

A float is the objective's value; a dict gives several named values, picked with
``module:function[key]``. The module must be importable by the search process and by every
worker (installed, or on ``PYTHONPATH``). :func:`resolve_callable` is called when the space is
loaded, so a missing module or function is a one-line problem before anything runs; a callable
that raises or returns something else fails that candidate only (the search goes on).

Generated tokens: each answer's tokens up to and including the one that ended it (the EOS, or
the token that completed one of the task's stop strings), or all of them when it ran to
``max_gen_toks``. On the hf backend :class:`GenerationCounter` reads them from the resident
model's ``generate`` (lm-eval generates a batch until every row has met a stop string, so the
tokens a row generated past its own stop are not counted: the count does not depend on the batch
size); the vLLM backend counts what its engine returns, which stops each request there
(:mod:`evomerge.evaluate.vllm`). Both count the same tokens for the same greedy answers
(``tests/test_vllm_tokens.py``). Loglikelihood tasks generate nothing (their count is 0).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import Any

from evomerge.errors import EvomergeError

# module:function, optionally [key] (one entry of a dict return)
CALLABLE = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)(?:\[(?P<key>[^\[\]]+)\])?$")
TOKENS_GENERATED = "tokens_generated"  # the EvalResult.extra entry the counting evaluator adds


@lru_cache(maxsize=None)
def resolve_callable(target: str) -> Callable[..., Any]:
    """The function named by ``target`` (``module:function``, a ``[key]`` ignored). Raises one
    :class:`EvomergeError` line naming what is wrong and the fix."""
    m = CALLABLE.match(target)
    if m is None:
        raise EvomergeError(f"objective {target!r} is not module:function or module:function[key] "
                            "(e.g. my_scorers:brevity)")
    module_name, name = m["module"], m["function"]
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001  the user's module may fail in any way while importing
        detail = f"{type(err).__name__}: {err}".splitlines()[0]
        raise EvomergeError(f"objective {target!r}: cannot import module {module_name} ({detail}); "
                            "install it or put its folder on PYTHONPATH (for every worker too)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise EvomergeError(f"objective {target!r}: module {module_name} has no function {name}; "
                            "check the name after the ':'")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise EvomergeError(f"objective {target!r}: {name} must take (model, tokenizer); "
                            f"its signature is {name}{inspect.signature(fn)}") from None
    except ValueError:
        pass  # builtins without a signature: the call will tell
    return fn


def call_objective(target: str, model: Any, tokenizer: Any) -> float | dict[str, float]:
    """Call the function of ``target`` on the candidate; returns a finite float or a dict of
    them. A wrong return raises one :class:`EvomergeError` line (the candidate fails)."""
    import torch

    with torch.no_grad():
        got = resolve_callable(target)(model, tokenizer)
    if isinstance(got, dict):
        if not got or not all(isinstance(k, str) and _number(v) for k, v in got.items()):
            raise EvomergeError(f"objective {target} returned {_show(got)}; return a float or a "
                                "non-empty dict of str -> float")
        return {k: float(v) for k, v in got.items()}
    if not _number(got):
        raise EvomergeError(f"objective {target} returned {_show(got)}; return a float or a dict "
                            "of str -> float")
    return float(got)


def callable_value(target: str, returned: float | dict[str, float]) -> float:
    """The objective value of ``target`` in what its function returned (``[key]`` picks a dict
    entry). Raises one :class:`EvomergeError` line when the return does not fit the name."""
    key = CALLABLE.match(target)["key"]
    if key is None and isinstance(returned, dict):
        raise EvomergeError(f"objective {target} returned a dict ({', '.join(sorted(returned))}); "
                            f"name one entry, e.g. {target}[{sorted(returned)[0]}]")
    if key is not None:
        if not isinstance(returned, dict) or key not in returned:
            have = ", ".join(sorted(returned)) if isinstance(returned, dict) else "a float"
            raise EvomergeError(f"objective {target}: the function returned no entry {key!r} "
                                f"(it returned {have})")
        return returned[key]
    return returned


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) or (
        hasattr(v, "item") and getattr(v, "ndim", 1) == 0 and _number(v.item()))


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# ---------------------------------------------------------------- generated tokens
class GenerationCounter:
    """Counts the tokens ``model.generate`` produces while the block runs (the model's own
    ``generate`` is shadowed by a counting one on the instance and restored after)::

        with GenerationCounter(model) as counter:
            evaluator.evaluate(model, tokenizer)
        counter.tokens
    """

    def __init__(self, model: Any) -> None:
        self.model, self.tokens = model, 0

    def __enter__(self) -> GenerationCounter:
        original = self.model.generate

        def counting_generate(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            prompt = kwargs.get("input_ids", args[0] if args else None)
            self.tokens += self.new_tokens(out, 0 if prompt is None else prompt.shape[-1],
                                           _eos_ids(self.model, kwargs), _stops(kwargs))
            return out

        self.model.generate = counting_generate
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.generate  # the class's generate again

    @staticmethod
    def new_tokens(out: Any, prompt_len: int, eos_ids: set[int] = frozenset(),
                   stops: tuple[Any, tuple[str, ...]] | None = None) -> int:
        """Tokens after the prompt in each row of ``out`` (ids, or an output with ``sequences``),
        each row cut after its first EOS (``eos_ids``; the padding after it goes too) and after
        the token whose decoding first contains a stop string (``stops``: tokenizer and
        strings)."""
        total = 0
        for row in getattr(out, "sequences", out)[:, prompt_len:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            if stops is not None:
                n = _first_stop(row[:n], *stops)
            total += n
        return total


def _eos_ids(model: Any, kwargs: dict[str, Any]) -> set[int]:
    """The ids ``generate`` stops a row at: the call's ``eos_token_id``, else the model's."""
    eos = kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _stops(kwargs: dict[str, Any]) -> tuple[Any, tuple[str, ...]] | None:
    """The stop strings of lm-eval's stopping criteria (each has ``sequence`` and ``tokenizer``)."""
    criteria = [c for c in kwargs.get("stopping_criteria") or () if hasattr(c, "sequence")]
    return (criteria[0].tokenizer, tuple(c.sequence for c in criteria)) if criteria else None


def _first_stop(row: list[int], tokenizer: Any, stops: tuple[str, ...]) -> int:
    """The length of the shortest prefix of ``row`` whose text contains a stop string (``len(row)``
    if none does); a binary search, as a longer prefix's text contains a shorter one's."""
    def stopped(k: int) -> bool:
        text = tokenizer.decode(row[:k])
        return any(s in text for s in stops)

    if not row or not stopped(len(row)):
        return len(row)
    lo, hi = 1, len(row)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stopped(mid) else (mid + 1, hi)
    return lo


class TokenCountingEvaluator:
    """An evaluator that adds the tokens the model generated to each result
    (``EvalResult.extra["tokens_generated"]``); everything else is the wrapped one's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def evaluate(self, model: Any, tokenizer: Any = None) -> Any:
        if not hasattr(model, "generate"):  # a model directory: the evaluator loads its own copy
            return self.inner.evaluate(model, tokenizer)
        with GenerationCounter(model) as counter:
            result = self.inner.evaluate(model, tokenizer)
        # an evaluator that counts its own generation (vLLM's engine) keeps its count
        return replace(result, extra={TOKENS_GENERATED: counter.tokens, **result.extra})

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
