"""Router initialisation: one row per expert and layer, from prompts or at random (mergekit-moe's
semantics, our code).

For each expert, its positive prompts are tokenized as one batch (the tokenizer's BOS prepended,
no other special tokens, padded on the left with BOS, as mergekit-moe does) and reduced to one
vector per layer; negative prompts the same, subtracted; the difference is scaled to unit length
per layer. The reductions:

- ``hidden``/``hidden_last``: the hidden state entering each decoder layer at the last position,
  averaged over the prompts (the base model runs on the requested device, in ``dtype``);
- ``hidden_avg``: the same states averaged over all positions (padding included, as mergekit);
- ``cheap_embed``: token embeddings summed over the prompts' real tokens, unit length, the same
  row for every layer (no forward pass);
- ``random``/``uniform_random``: standard normal rows / torch.nn.Linear's default uniform rows,
  drawn from a generator seeded by ``seed`` (no prompts, not normalised).

Results are float32 on the CPU, shaped (layers, experts, hidden).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from merge_engine.randomness import derive_seed

Reduce = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # token batch -> (layers, hidden)


def load_prompt_tokenizer(model_dir: Path):
    """The base model's tokenizer, set up as mergekit-moe uses it: left padding with BOS (EOS
    where there is no BOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    elif tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def empty_prompts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """The prompts that tokenize to no token at all (without special tokens)."""
    return [p for p in prompts if not tokenizer(p, add_special_tokens=False)["input_ids"]]


def tokenize(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """One left-padded batch of ``prompts``, each prefixed with the tokenizer's BOS text."""
    bos = tokenizer.bos_token or ""
    batch = tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def gate_rows(prompt_sets: Sequence[tuple[Sequence[str], Sequence[str]]], reduce: Reduce,
              tokenizer) -> torch.Tensor:
    """(layers, experts, hidden): per expert (positive, negative prompts), reduce(positive) -
    reduce(negative), unit length per layer."""
    rows = []
    for positive, negative in prompt_sets:
        row = reduce(tokenize(tokenizer, positive))
        if negative:
            row = row - reduce(tokenize(tokenizer, negative))
        rows.append(row / row.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def random_rows(mode: str, num_layers: int, num_experts: int, hidden: int, seed: int) -> torch.Tensor:
    """(layers, experts, hidden) drawn on the CPU from a generator seeded by ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, "moe.router", 0))
    shape = (num_layers, num_experts, hidden)
    if mode == "random":
        return torch.randn(shape, generator=g)
    bound = math.sqrt(1.0 / hidden)  # torch.nn.Linear's default for `hidden` inputs
    return torch.rand(shape, generator=g) * 2 * bound - bound


def cheap_embed_reduce(embed: torch.Tensor, num_layers: int) -> Reduce:
    """Summed embeddings of the batch's real tokens, unit length, repeated for every layer."""
    table = embed.float()

    def reduce(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        total = (table[batch["input_ids"]] * mask).sum(dim=(0, 1))
        total = total / total.norm().clamp(min=1e-8)
        return total.unsqueeze(0).repeat(num_layers, 1)
    return reduce


class _Enough(Exception):
    """Raised by the last layer's hook: every state needed was seen, the rest of the pass is skipped."""


class HiddenStates:
    """The base model loaded once on ``device`` in ``dtype``; :meth:`reduce` gives per-layer input
    states of a prompt batch, captured by hooks on the decoder layers (the LM head never runs).

    Use as a context manager: the model is released on exit."""

    def __init__(self, model_dir: Path, *, device: torch.device, dtype: torch.dtype, average: bool,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        self.device = device
        self.average = average
        # device_map puts each weight straight on the device: no full copy in host memory first
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map={"": str(device)},
                                                          trust_remote_code=trust_remote_code)
        self.model.eval()
        self.layers = list(self.model.get_decoder().layers)

    def __enter__(self) -> HiddenStates:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model, self.layers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reduce(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        last = len(self.layers) - 1

        def hook(index: int):
            def capture(_module, args, kwargs):
                states = args[0] if args else kwargs["hidden_states"]
                states = states.float()
                picked = states.mean(dim=1) if self.average else states[:, -1, :]
                seen.append(picked.mean(dim=0).cpu())
                if index == last:
                    raise _Enough
            return capture

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                self.model.get_decoder()(**{k: v.to(self.device) for k, v in batch.items()})
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack(seen)
