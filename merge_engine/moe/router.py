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
from typing import Any

import torch

from merge_engine.randomness import derive_seed

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


def gate_rows(prompt_sets: Sequence[tuple[Sequence[str], Sequence[str]]],
              vector: Callable[[Sequence[str]], torch.Tensor]) -> torch.Tensor:
    """(layers, experts, hidden): per expert (positive, negative prompts), vector(positive) -
    vector(negative), unit length per layer."""
    rows = []
    for positive, negative in prompt_sets:
        row = vector(positive)
        if negative:
            row = row - vector(negative)
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


def cheap_embed_vector(embed: torch.Tensor, tokenizer, num_layers: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """Summed embeddings of a prompt list's real tokens, unit length, repeated for every layer."""
    table = embed.float()

    def vector(prompts: Sequence[str]) -> torch.Tensor:
        batch = tokenize(tokenizer, prompts)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        total = (table[batch["input_ids"]] * mask).sum(dim=(0, 1))
        total = total / total.norm().clamp(min=1e-8)
        return total.unsqueeze(0).repeat(num_layers, 1)
    return vector


def model_from_tensors(model_dir: Path, tensors: Any, *, device: torch.device, dtype: torch.dtype):
    """The model of ``model_dir``'s config with ``tensors`` as its weights, loaded the way its
    folder would be (in ``dtype``, on ``device``, eval mode): the hidden states of a merge held in
    memory equal those of the same merge written to disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=dict(tensors), dtype=dtype)
    return model.to(device).eval()


class _Enough(Exception):
    """Raised by the last layer's hook: every state needed was seen, the rest of the pass is skipped."""


class HiddenStates:
    """Per-layer input states of prompt lists through one base model, kept across builds.

    The model is loaded on first use (on ``device`` in ``dtype``; the LM head never runs: hooks
    on the decoder layers capture their inputs and the pass stops before the last layer's work),
    and each prompt list's vectors are computed once (a search builds many MoEs from one pool of
    prompts). :meth:`close` (or leaving the ``with`` block) releases the model; vectors stay."""

    def __init__(self, model_dir: Path, tokenizer, *, device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool = False, model: Any = None) -> None:
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.model = model  # given: a model already on ``device`` in ``dtype`` (not loaded from model_dir)
        self.passes = 0  # forward passes run (one per prompt list not seen before)
        self._vectors: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> HiddenStates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.model is not None:
            self.model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def last(self, prompts: Sequence[str]) -> torch.Tensor:
        """(layers, hidden): each layer's input state at the last position, averaged over prompts."""
        return self._states(tuple(prompts))[0]

    def average(self, prompts: Sequence[str]) -> torch.Tensor:
        """(layers, hidden): each layer's input state averaged over positions, then prompts."""
        return self._states(tuple(prompts))[1]

    def _load(self):
        from transformers import AutoModelForCausalLM

        # device_map puts each weight straight on the device: no full copy in host memory first
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.dtype,
                                                     device_map={"": str(self.device)},
                                                     trust_remote_code=self.trust_remote_code)
        return model.eval()

    def _states(self, prompts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if prompts in self._vectors:
            return self._vectors[prompts]
        if self.model is None:
            self.model = self._load()
        decoder = self.model.get_decoder()
        layers = list(decoder.layers)
        last: list[torch.Tensor] = []
        avg: list[torch.Tensor] = []

        def hook(index: int):
            def capture(_module, args, kwargs):
                states = (args[0] if args else kwargs["hidden_states"]).float()
                last.append(states[:, -1, :].mean(dim=0).cpu())
                avg.append(states.mean(dim=1).mean(dim=0).cpu())
                if index == len(layers) - 1:
                    raise _Enough
            return capture

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        batch = tokenize(self.tokenizer, prompts)
        try:
            with torch.no_grad():
                decoder(**{k: v.to(self.device) for k, v in batch.items()})
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        self._vectors[prompts] = torch.stack(last), torch.stack(avg)
        return self._vectors[prompts]
