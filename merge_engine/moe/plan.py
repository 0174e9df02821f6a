"""Check an MoE build against its models and lay out every output tensor, before any tensor is read.

:func:`prepare_moe` opens a reader per model (headers and config.json only), checks everything
(the file's rules, one architecture and layer stack for all models, equal shapes, MLPs the output
can hold, prompts that tokenize, the output architecture) and raises one RecipeError listing every
problem; then it plans the output: one :class:`OutTensor` per tensor, saying where it comes from.
The disk build and the in-memory build both consume that plan (:mod:`merge_engine.moe.build`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from merge_engine.dtypes import dtype_name, torch_dtype
from merge_engine.errors import MergeError, RecipeError
from merge_engine.io.refs import ModelRef
from merge_engine.layout import check_compatible, detect_layout
from merge_engine.moe.arch import MLP_PROJECTIONS, OutputArch, select_architecture
from merge_engine.moe.config import RANDOM_MODES, Expert, MoEConfig, config_problems

Kind = Literal["copy", "expert", "router", "shared_router", "zeros"]


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: its name, shape, and where it comes from.

    ``copy``: tensor ``source`` of model ``model``; ``expert``: the same, with the expert's noise
    (and, for a down projection, residual scale) applied; ``router``/``shared_router``: the router
    rows of layer ``layer``; ``zeros``: a bias the output needs and the base lacks."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    model: ModelRef | None = None
    source: str | None = None
    expert: Expert | None = None
    layer: int = -1


@dataclass
class MoEPlan:
    """A checked build: the output architecture and config, the tensors, and the open readers."""

    config: MoEConfig
    arch: OutputArch
    out_config: dict[str, Any]
    out_dtype: torch.dtype
    tensors: list[OutTensor]
    readers: dict[ModelRef, Any]
    base_dir: Path
    num_layers: int
    hidden_size: int
    tokenizer: Any  # the prompt tokenizer (None for random gate modes)


def prepare_moe(config: MoEConfig, stack: ExitStack, *, opened: dict[ModelRef, Any] | None = None,
                allow_same_experts: bool = False, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> MoEPlan:
    """Check ``config`` and its models and plan the output; RecipeError lists every problem.

    Readers opened here are entered into ``stack`` (the caller closes them). ``opened`` is the
    caller's cache of open readers across calls: its readers are reused, new ones join it."""
    from merge_engine.io.resolve import resolve_model_dir
    from merge_engine.session import _model as open_model  # the session's one way to open a model

    problems = config_problems(config, allow_same_experts=allow_same_experts)
    if problems:
        raise RecipeError(problems)
    roles = [("base_model", config.base_model)]
    roles += [(f"experts[{i}]", e.source_model) for i, e in enumerate(config.experts)]
    roles += [(f"shared_experts[{i}]", e.source_model) for i, e in enumerate(config.shared_experts or [])]
    cache = opened if opened is not None else {}
    readers: dict[ModelRef, Any] = {}
    for where, ref in roles:
        if ref in readers:
            continue
        try:
            if ref not in cache:
                cache[ref] = open_model(ref, stack, allow_pickle, trust_remote_code)
            readers[ref] = cache[ref]
        except MergeError as err:
            problems.append(f"{where}: {err}")
    if problems:
        raise RecipeError(problems)

    base = readers[config.base_model]
    types = [str(readers[ref].config.get("model_type")) for _, ref in roles]
    arch = None
    try:
        arch = select_architecture(config, types)
    except ValueError as err:
        problems.append(str(err))
    if len(set(types)) == 1:  # models of several architectures: that one line says it all
        problems += _model_problems(config, readers, roles)
    if arch is not None:
        held = {f"self_attn.{p}.bias" for p in arch.attention_biases}
        odd = sorted({n.split(".", 3)[3] for n in base.tensor_names
                      if n.startswith("model.layers.") and n.endswith(".bias") and ".mlp." not in n}
                     - held)
        if odd:
            problems.append(f"base_model {config.base_model} has biases {', '.join(odd)}, which {arch.name} "
                            "output cannot hold; pick another architecture or base model")
    base_dir = resolve_model_dir(config.base_model)
    tokenizer = None
    if config.gate_mode not in RANDOM_MODES:
        tokenizer, more = _prompt_problems(config, base_dir)
        problems += more
    if config.gate_mode == "cheap_embed" and "model.embed_tokens.weight" not in base:
        problems.append(f"base_model {config.base_model} has no model.embed_tokens.weight, which "
                        "gate_mode cheap_embed reads; use gate_mode hidden")
    if config.gate_mode.startswith("hidden") and config.base_model.lora:
        problems.append(f"base_model {config.base_model}: gate_mode {config.gate_mode} runs the base model, "
                        "which cannot carry an adapter; merge the adapter into a folder first")
    if problems or arch is None:
        raise RecipeError(problems)

    out_dtype = _output_dtype(config, base)
    num_layers = detect_layout(base.tensor_names, base.config).num_layers
    base_config = base.config
    out_config = arch.config(base_config, len(config.experts), config.experts_per_token, dtype_name(out_dtype))
    hidden = int(base_config["hidden_size"])
    tensors = _plan_tensors(config, arch, readers, num_layers, hidden)
    return MoEPlan(config, arch, out_config, out_dtype, tensors, readers, base_dir, num_layers, hidden, tokenizer)


def _model_problems(config: MoEConfig, readers: dict[ModelRef, Any], roles: list[tuple[str, ModelRef]]) -> list[str]:
    """One layer stack, equal shapes and plain MLPs (gate/up/down weights, no biases) everywhere."""
    named = {f"{where} ({ref})": readers[ref] for where, ref in roles}
    problems = check_compatible(named)
    if problems:
        return problems
    base = readers[config.base_model]
    layout = detect_layout(base.tensor_names, base.config)
    if layout.prefix != "model.layers.":
        return [f"base_model {config.base_model} keeps its layers under {layout.prefix!r}, not "
                "'model.layers.'; MoE outputs are built from Llama-style checkpoints"]
    for key, reader in named.items():
        count = detect_layout(reader.tensor_names, reader.config).num_layers
        if count != layout.num_layers:
            problems.append(f"{key} has {count} layers but the base model has {layout.num_layers}; "
                            "every expert must have the base's layer count")
    mlp = {s for s in layout.suffixes if s.startswith("mlp.")}
    wanted = {f"mlp.{p}.weight" for p in MLP_PROJECTIONS}
    if mlp != wanted:
        odd = ", ".join(sorted(mlp ^ wanted))
        problems.append(f"base_model {config.base_model}: its MLP tensors differ from gate/up/down_proj "
                        f"weights ({odd}); MoE experts are built from plain gated MLPs")
    return problems


def _prompt_problems(config: MoEConfig, base_dir: Path) -> tuple[Any, list[str]]:
    from merge_engine.moe.router import empty_prompts, load_prompt_tokenizer

    try:
        tokenizer = load_prompt_tokenizer(base_dir)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, [f"base_model {config.base_model}: its tokenizer cannot be loaded ({first}); "
                      f"gate_mode {config.gate_mode} tokenizes the prompts with it"]
    problems = []
    experts = [(f"experts[{i}]", e) for i, e in enumerate(config.experts)]
    experts += [(f"shared_experts[{i}]", e) for i, e in enumerate(config.shared_experts or [])]
    for where, expert in experts:
        for kind in ("positive_prompts", "negative_prompts"):
            for prompt in empty_prompts(tokenizer, getattr(expert, kind) or []):
                problems.append(f"{where}.{kind}: {prompt!r} tokenizes to no tokens with the base model's "
                                "tokenizer; write a prompt with text it knows")
    return tokenizer, problems


def _output_dtype(config: MoEConfig, base: Any) -> torch.dtype:
    """The config's dtype, else the base model's declared dtype, else its embedding's stored dtype."""
    if config.dtype is not None:
        return torch_dtype(config.dtype)
    declared = base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(declared, str):
        try:
            return torch_dtype(declared)
        except ValueError:
            pass
    embed = next((n for n in base.tensor_names if "embed_tokens" in n), base.tensor_names[0])
    stored = base.dtype(embed)
    return stored if dtype_name(stored) else torch.float32


def _plan_tensors(config: MoEConfig, arch: OutputArch, readers: dict[ModelRef, Any], num_layers: int,
                  hidden: int) -> list[OutTensor]:
    base = readers[config.base_model]
    out = [OutTensor(n, tuple(base.shape(n)), "copy", config.base_model, n)
           for n in base.tensor_names if ".mlp." not in n]
    names = {t.name for t in out}
    for i in range(num_layers):
        if arch.qkv_bias:  # Qwen2-MoE attention always has q/k/v biases
            for p in ("q_proj", "k_proj", "v_proj"):
                bias = f"model.layers.{i}.self_attn.{p}.bias"
                if bias not in names:
                    rows = base.shape(f"model.layers.{i}.self_attn.{p}.weight")[0]
                    out.append(OutTensor(bias, (rows,), "zeros"))
        out.append(OutTensor(arch.router.format(i=i), (len(config.experts), hidden), "router", layer=i))
        for e, expert in enumerate(config.experts):
            for proj in MLP_PROJECTIONS:
                src = f"model.layers.{i}.mlp.{proj}.weight"
                shape = tuple(readers[expert.source_model].shape(src))
                out.append(OutTensor(arch.expert_name(i, e, proj), shape, "expert", expert.source_model, src, expert))
        if arch.shared is not None:
            shared = (config.shared_experts or [])[0]
            for proj in MLP_PROJECTIONS:
                src = f"model.layers.{i}.mlp.{proj}.weight"
                shape = tuple(readers[shared.source_model].shape(src))
                out.append(OutTensor(arch.shared.format(i=i, proj=proj), shape, "expert", shared.source_model,
                                     src, shared))
            out.append(OutTensor(arch.shared_gate.format(i=i), (1, hidden), "shared_router", layer=i))
    return out
