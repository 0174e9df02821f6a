"""Per vocabulary tensor (embedding, LM head): each input's rows laid out on the output vocabulary.

Every input gets a tensor of the output's rows, which the merge method then merges as usual. For
output token ``t`` and input ``m`` (mergekit's rules):

* ``m`` has ``t`` and no ``tokenizer.tokens`` entry forces it: ``m``'s own row;
* otherwise ``t``'s default row, the same for every input that takes it:
  - a ``tokenizer.tokens`` entry: its ``source`` (a model's row of ``t``, a ``model_token`` row,
    or zeros);
  - else, when exactly one input has ``t``: that input's row; none: zeros; the base among the
    inputs has it: the base's row; else the mean of the rows of the inputs that have it;
* rows past the vocabulary (``pad_to_multiple_of``) are the mean of the input's rows above them.

Rows are accumulated in the inputs' promoted dtype, in input order, then divided (a mean).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merge_engine.errors import RecipeError
from merge_engine.io.refs import ModelRef
from merge_engine.tokenizer.vocab import Vocabulary


@dataclass(frozen=True, eq=False)
class RowPlan:
    """Index tensors for one vocabulary tensor; immutable once planned, shared across merges.

    ``own[i]`` = (output ids, source rows) input ``i`` copies; ``parts[i]`` = (positions in
    ``default_ids``, source rows) input ``i`` adds into the default rows, divided by ``divisor``;
    ``takes[i]`` = positions in ``default_ids`` input ``i`` takes.
    """

    rows: int
    size: int
    own: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    default_ids: torch.Tensor
    parts: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    divisor: torch.Tensor
    takes: tuple[torch.Tensor, ...]

    def align(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs' tensors (in planned order, vocabulary on dim 0) laid out on the output rows."""
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        device = tensors[0].device
        tail = tuple(tensors[0].shape[1:])
        default = torch.zeros((len(self.default_ids), *tail), dtype=dtype, device=device)
        for t, (pos, src) in zip(tensors, self.parts):
            if len(pos):
                default.index_add_(0, pos.to(device), t[src.to(device)].to(dtype))
        default /= self.divisor.to(device, dtype).view(-1, *([1] * len(tail)))
        ids = self.default_ids.to(device)
        out = []
        for t, (dst, src), take in zip(tensors, self.own, self.takes):
            new = torch.zeros((self.rows, *tail), dtype=dtype, device=device)
            new[dst.to(device)] = t[src.to(device)].to(dtype)
            take = take.to(device)
            new[ids[take]] = default[take]
            if self.rows > self.size:
                new[self.size:] = new[: self.size].mean(dim=0)
            out.append(new)
        return out


def plan_rows(vocab: Vocabulary, recipe: Any, models: Sequence[ModelRef], tensor_rows: Sequence[int],
              tensor_name: str) -> RowPlan | None:
    """The row plan of tensor ``tensor_name`` merged from ``models`` (in the merge's input order,
    ``tensor_rows`` their rows) under ``recipe``'s base and ``tokenizer.tokens``. Raises
    RecipeError when a token's setting cannot be met; None when every input's rows already are the
    output's. Cached: a search plans the same tensors
    again and again."""
    settings = (recipe.tokenizer.tokens if recipe.tokenizer is not None else None) or {}
    return _plan(vocab, tuple(models), recipe.base_model, tuple(sorted(settings.items())),
                 tuple(tensor_rows), tensor_name)


@functools.lru_cache(maxsize=16)
def _plan(vocab: Vocabulary, models: tuple[ModelRef, ...], base: ModelRef | None,
          settings: tuple[tuple[str, Any], ...], tensor_rows: tuple[int, ...], tensor_name: str) -> RowPlan | None:
    size = len(vocab.tokens)
    index = torch.tensor([vocab.index[m] for m in models], dtype=torch.long).view(len(models), size)
    index[index >= torch.tensor(tensor_rows).view(-1, 1)] = -1  # a tensor shorter than its config
    present = index >= 0
    count = present.sum(0)
    n = len(models)
    configured = {vocab.tokens[t]: s for t, s in settings}
    plain = torch.ones(size, dtype=torch.bool)
    plain[list(configured)] = False

    defaults: dict[int, tuple[list[tuple[int, int]], int, list[int]]] = {}  # id -> (parts, divisor, takers)
    need = (plain & (count < n)).nonzero().flatten().tolist()
    base_pos = models.index(base) if base in models else None
    for tid in need:
        holders = present[:, tid].nonzero().flatten().tolist()
        takers = [i for i in range(n) if i not in holders]
        if len(holders) == 1 or (len(holders) > 1 and base_pos in holders):
            donor = holders[0] if len(holders) == 1 else base_pos
            defaults[tid] = ([(donor, int(index[donor, tid]))], 1, takers)
        else:  # none: zeros; several without the base: their mean
            defaults[tid] = ([(i, int(index[i, tid])) for i in holders], max(len(holders), 1), takers)
    for tid, setting in configured.items():
        if not setting.force and count[tid] == n:
            continue
        takers = list(range(n)) if setting.force else [i for i in range(n) if not present[i, tid]]
        parts = _configured_parts(_token(vocab, tid, settings), tid, setting, vocab, models, index,
                                  tensor_rows, tensor_name)
        defaults[tid] = (parts, 1, takers)

    ids = sorted(defaults)
    where = {tid: k for k, tid in enumerate(ids)}
    forced_ids = [tid for tid, s in configured.items() if s.force]
    own = []
    for i in range(n):
        keep = present[i].clone()
        keep[forced_ids] = False
        dst = keep.nonzero().flatten()
        own.append((dst, index[i, dst]))
    parts = tuple(_pairs([(where[tid], row) for tid in ids for j, row in defaults[tid][0] if j == i])
                  for i in range(n))
    takes = tuple(torch.tensor([where[tid] for tid in ids if i in defaults[tid][2]], dtype=torch.long)
                  for i in range(n))
    divisor = torch.tensor([float(defaults[tid][1]) for tid in ids], dtype=torch.float64)
    identity = torch.arange(size)
    if not ids and vocab.rows == size and all(r == size for r in tensor_rows) and \
            all(torch.equal(src, identity) for _, src in own):
        return None  # every input already has the output's rows: nothing to lay out
    return RowPlan(vocab.rows, size, tuple(own), torch.tensor(ids, dtype=torch.long), parts, divisor, takes)


def _token(vocab: Vocabulary, tid: int, settings: tuple[tuple[str, Any], ...]) -> str:
    return next(t for t, _ in settings if vocab.tokens[t] == tid)


def _pairs(items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor([p for p, _ in items], dtype=torch.long)
    rows = torch.tensor([r for _, r in items], dtype=torch.long)
    return pos, rows


def _configured_parts(token: str, tid: int, setting: Any, vocab: Vocabulary, models: tuple[ModelRef, ...],
                      index: torch.Tensor, tensor_rows: tuple[int, ...], tensor_name: str) -> list[tuple[int, int]]:
    """(input position, row) of a ``tokenizer.tokens`` entry's source row; [] for zeros."""
    src = setting.source
    where = f"tokenizer.tokens[{token!r}]"
    if src is None:
        raise RecipeError(f"{where} has no source, yet not every model of {tensor_name} has the token; "
                          "give it a source (a model, {kind: model_token, ...} or {kind: zero})")
    if getattr(src, "kind", None) == "zero":
        return []
    donor = src if isinstance(src, ModelRef) else src.model
    if donor not in models:
        raise RecipeError(f"{where} takes its row from {donor}, which is not merged into {tensor_name}; "
                          "use one of that tensor's models")
    pos = models.index(donor)
    if isinstance(src, ModelRef):
        row = int(index[pos, tid])
        if row < 0:
            raise RecipeError(f"{where}: {donor} has no token {token!r}; take its row from another "
                              "model or with {kind: model_token, ...}")
        return [(pos, row)]
    row = src.token_id if src.token_id is not None else vocab.originals[donor].get(src.token, -1)
    if not 0 <= row < tensor_rows[pos]:
        what = f"token id {src.token_id}" if src.token_id is not None else f"token {src.token!r}"
        raise RecipeError(f"{where}: {donor} has no {what} in {tensor_name} ({tensor_rows[pos]} rows); "
                          "name a token it has")
    return [(pos, row)]
