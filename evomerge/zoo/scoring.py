"""Plain-torch scoring of zoo models, independent of lm-eval (used at build time and to cross-check it).

* :func:`mc_accuracy` — multiple-choice log-likelihood: the choice whose tokens have the highest
  summed log-probability after the prompt wins (lm-eval's ``acc`` for ``multiple_choice``).
* :func:`exact_match` — greedy decoding until a newline, compared with the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast

from evomerge.zoo.skills import Example


@torch.no_grad()
def choice_logprobs(model, tok: PreTrainedTokenizerFast, examples: Sequence[Example],
                    batch: int = 256) -> list[list[float]]:
    """Summed log-probability of each choice of each example, given its prompt (with <s>)."""
    items = []  # (example index, prompt ids, choice ids)
    for i, ex in enumerate(examples):
        p = tok(ex.prompt)["input_ids"]
        for c in ex.choices:
            items.append((i, p, tok(c, add_special_tokens=False)["input_ids"]))
    scores: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        rows = [p + c for _, p, c in chunk]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])  # (B, T)
        mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for b, (i, p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # positions predicting the choice
            scores[i].append(logp[b, pos, torch.tensor(c)].sum().item())
    return scores


def mc_accuracy(model, tok: PreTrainedTokenizerFast, examples: Sequence[Example]) -> float:
    """Fraction of examples whose labelled choice has the highest log-likelihood."""
    scores = choice_logprobs(model, tok, examples)
    hits = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples))
    return hits / len(examples)


@torch.no_grad()
def greedy_answers(model, tok: PreTrainedTokenizerFast, prompts: Sequence[str],
                   max_new: int = 12) -> list[str]:
    """Greedy continuations of ``prompts`` up to the first newline (no KV cache; tiny models)."""
    out = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    encoded = [tok(p)["input_ids"] for p in prompts]
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    nl = tok("\n", add_special_tokens=False)["input_ids"][0]
    for idx in by_len.values():  # same-length prompts batch without padding
        ids = torch.tensor([encoded[i] for i in idx])  # (B, T)
        done = torch.zeros(len(idx), dtype=torch.bool)
        gen = []
        for _ in range(max_new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)  # (B,)
            done |= nxt == nl
            gen.append(torch.where(done, nl, nxt))
            ids = torch.cat([ids, nxt[:, None]], 1)
            if done.all():
                break
        gen_t = torch.stack(gen, 1)
        for row, i in enumerate(idx):
            text = tok.decode(gen_t[row].tolist(), skip_special_tokens=True)
            out[i] = text.split("\n")[0]
    return out


def exact_match(model, tok: PreTrainedTokenizerFast, examples: Sequence[Example]) -> float:
    """Fraction of examples whose greedy answer equals the reference answer."""
    answers = greedy_answers(model, tok, [ex.prompt for ex in examples])
    return sum(a == ex.answer for a, ex in zip(answers, examples)) / len(examples)
