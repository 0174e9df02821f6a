"""Deterministic CPU training of the zoo's tiny Llama models.

:func:`make_model` builds a fresh model from a :class:`ModelSpec`; :func:`train` runs AdamW on a
skill mixture described by a :class:`TrainSpec`, with the loss on answer tokens only. Same specs
and seeds give bit-identical weights on the same machine and torch build.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.skills import sample


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a zoo model. head_dim = hidden / heads must be 64 (vLLM's CPU attention needs it)."""

    hidden: int = 256
    layers: int = 2
    heads: int = 4
    intermediate: int = 1024
    max_positions: int = 64

    def config(self, vocab_size: int, tok: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.heads, head_dim=self.hidden // self.heads,
            max_position_embeddings=self.max_positions, tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)


@dataclass(frozen=True)
class TrainSpec:
    """One training run: ``mixture`` maps skill name to sampling weight; ``trainable`` is a regex
    over parameter names (others stay frozen)."""

    steps: int
    lr: float
    mixture: Mapping[str, float] = field(default_factory=dict)
    batch: int = 64
    warmup: int = 50
    weight_decay: float = 0.0
    trainable: str = ".*"
    lora_rank: int = 0  # > 0: train a rank-r delta of each matching Linear weight, folded in at the end
    seed: int = 0


class _LowRankDelta(torch.nn.Module):
    """Parametrisation ``W -> W + B @ A`` (B starts at zero, so training starts at the base)."""

    def __init__(self, out_features: int, in_features: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(rank, in_features, generator=gen) / in_features**0.5)
        self.b = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.b @ self.a  # (out, in)


def make_model(spec: ModelSpec, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the initial weights depend only on ``spec`` and ``seed``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(len(tok), tok))
    return model.float()


def encode_batch(tok: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    """Token ids, attention mask and labels (-100 outside the answer) for (prompt, answer) pairs.

    The answer is followed by a newline, which is trained too (it ends generation)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tok(prompt)["input_ids"]  # starts with <s>
        a = tok(answer + "\n", add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, mask, lab


def train(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, spec: TrainSpec,
          log: Callable[[str], None] = print, log_every: int = 100) -> float:
    """Train ``model`` in place on ``spec``; return the mean loss of the last 50 steps."""
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    pattern = re.compile(spec.trainable)
    params = []
    lora = [m for n, m in model.named_modules()
            if spec.lora_rank and isinstance(m, torch.nn.Linear) and pattern.search(n)]
    for name, p in model.named_parameters():
        p.requires_grad_(not spec.lora_rank and bool(pattern.search(name)))
        if p.requires_grad:
            params.append(p)
    gen = torch.Generator().manual_seed(spec.seed)
    for module in lora:
        delta = _LowRankDelta(module.out_features, module.in_features, spec.lora_rank, gen)
        parametrize.register_parametrization(module, "weight", delta)
        params += [delta.a, delta.b]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    skills, weights = zip(*spec.mixture.items())
    model.train()
    recent: list[float] = []
    t0 = time.perf_counter()
    for step in range(spec.steps):
        # linear warm-up, cosine decay to 10%
        warm = min(1.0, (step + 1) / max(1, spec.warmup))
        decay = 0.55 + 0.45 * math.cos(math.pi * step / spec.steps)
        for g in opt.param_groups:
            g["lr"] = spec.lr * warm * decay
        chosen = rng.choices(skills, weights, k=spec.batch)
        exs = [sample(s, rng, "train") for s in chosen]
        ids, mask, lab = encode_batch(tok, [(e.prompt, e.answer) for e in exs])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{spec.steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval()
    for module in lora:  # fold the trained deltas into plain weights
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return sum(recent) / max(1, len(recent))
