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

Generated tokens (:class:`GenerationCounter`) are counted on the hf backend, where lm-eval calls
the resident model's ``generate``: the new tokens of each row, padding excluded. Loglikelihood
tasks generate nothing (their count is 0).
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
                                           kwargs.get("pad_token_id"))
            return out

        self.model.generate = counting_generate
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.generate  # the class's generate again

    @staticmethod
    def new_tokens(out: Any, prompt_len: int, pad_id: int | None) -> int:
        """Tokens after the prompt in each row of ``out`` (ids, or an output with ``sequences``),
        the padding of rows that stopped early excluded."""
        ids = getattr(out, "sequences", out)[:, prompt_len:]
        return int(ids.numel() if pad_id is None else (ids != pad_id).sum().item())


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
        return replace(result, extra={**result.extra, TOKENS_GENERATED: counter.tokens})

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
