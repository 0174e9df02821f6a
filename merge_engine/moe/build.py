"""Build an MoE from dense experts: to disk (streamed, atomic) or in memory, from one plan.

Lifecycle of both: :func:`~merge_engine.moe.plan.prepare_moe` checks everything and plans every
output tensor (no tensor read) -> the router rows are computed (the only step that runs a model:
the base, on ``device``, freed afterwards) -> each output tensor is read from its source model,
noised/scaled if its expert says so, cast to the output dtype and handed on one at a time. On
disk that is :class:`~merge_engine.io.writer.OutputWriter` (a temporary folder renamed into place
at the end: an interrupted build leaves nothing); in memory it is a dict of tensors. Both give
the same bits for the same config, ``seed`` and device type.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from merge_engine.devices import pick_device
from merge_engine.dtypes import torch_dtype
from merge_engine.io import DEFAULT_SHARD_SIZE
from merge_engine.moe.config import RANDOM_MODES, MoEConfig
from merge_engine.moe.plan import MoEPlan, OutTensor, prepare_moe
from merge_engine.randomness import derive_seed

#: mergekit-moe computes hidden states in bfloat16; so do we unless told otherwise
DEFAULT_ROUTER_DTYPE = "bfloat16"
CONFIG_COPY = "mergekit_moe_config.yml"  # the config, next to the weights (mergekit's file name)


@dataclass
class MoEResult:
    out_dir: Path | None
    tensors: int
    seconds: float
    architecture: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class MoEState:
    """An MoE held in memory: config.json's content, the checkpoint's tensors (the names and
    layout written to disk), and the folder whose tokenizer it uses."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    tokenizer_dir: Path
    architecture: str
    warnings: list[str] = field(default_factory=list)


def router_rows(plan: MoEPlan, *, device: torch.device, dtype: torch.dtype, seed: int,
                trust_remote_code: bool = False, states: Any = None) -> torch.Tensor:
    """(layers, gated experts, hidden) float32: routed experts' rows, then the shared expert's.

    ``states``: a :class:`~merge_engine.moe.router.HiddenStates` of the plan's base model kept by
    the caller across builds (hidden modes); without it one is made and released here."""
    from merge_engine.moe import router

    config = plan.config
    gated = config.gated_experts()
    if config.gate_mode in RANDOM_MODES:
        return router.random_rows(config.gate_mode, plan.num_layers, len(gated), plan.hidden_size, seed)
    sets = [(e.positive_prompts or [], e.negative_prompts or []) for e in gated]
    if config.gate_mode == "cheap_embed":
        embed = plan.readers[config.base_model].get("model.embed_tokens.weight")
        return router.gate_rows(sets, router.cheap_embed_vector(embed, plan.tokenizer, plan.num_layers))
    own = states is None
    if own:
        states = router.HiddenStates(plan.base_dir, plan.tokenizer, device=device, dtype=dtype,
                                     trust_remote_code=trust_remote_code)
    try:
        return router.gate_rows(sets, states.average if config.gate_mode == "hidden_avg" else states.last)
    finally:
        if own:
            states.close()


def degenerate_layers(rows: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above ``threshold``):
    the router will hardly tell those experts apart."""
    if rows.shape[1] < 2:
        return []
    return [i for i in range(rows.shape[0]) if float(torch.linalg.cond(rows[i].float())) > threshold]


def output_tensors(plan: MoEPlan, rows: torch.Tensor, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every planned output tensor, in plan order, one at a time (cast to the output dtype)."""
    routed = len(plan.config.experts)
    for t in plan.tensors:
        yield t.name, _produce(plan, t, rows, routed, seed)


def _produce(plan: MoEPlan, t: OutTensor, rows: torch.Tensor, routed: int, seed: int) -> torch.Tensor:
    dtype = plan.out_dtype
    if t.kind == "copy":
        return plan.readers[t.model].get(t.source, dtype=dtype)
    if t.kind == "zeros":
        return torch.zeros(t.shape, dtype=dtype)
    if t.kind == "router":
        return rows[t.layer, :routed].to(dtype).contiguous()
    if t.kind == "shared_router":
        return rows[t.layer, routed:routed + 1].to(dtype).contiguous()
    expert = t.expert
    noise = expert.noise_scale is not None
    residual = expert.residual_scale is not None and t.source.endswith("down_proj.weight")
    if not noise and not residual:
        return plan.readers[t.model].get(t.source, dtype=dtype)
    tensor = plan.readers[t.model].get(t.source, dtype=torch.float32)
    if noise:  # seeded per output tensor: the same noise on disk, in memory, on any device
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(seed, t.name, 0))
        tensor = tensor + torch.randn(tensor.shape, generator=g) * expert.noise_scale
    if residual:
        tensor = tensor * expert.residual_scale
    return tensor.to(dtype)


def _warnings(plan: MoEPlan, rows: torch.Tensor) -> list[str]:
    if plan.config.gate_mode in RANDOM_MODES:
        return []
    bad = degenerate_layers(rows[:, :len(plan.config.experts)])
    if not bad:
        return []
    where = "every layer" if len(bad) == plan.num_layers else "layers " + ", ".join(map(str, bad))
    return [f"router rows of {where} are nearly parallel (condition number > 5): the experts' prompts "
            "are too similar, and some experts will rarely be chosen"]


def build_moe(config: MoEConfig, out_dir: str | Path, *, device: str | None = "auto",
              router_dtype: str = DEFAULT_ROUTER_DTYPE, seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
              allow_same_experts: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
              force: bool = False, dry_run: bool = False,
              progress: Callable[[int, int], None] | None = None) -> MoEResult:
    """Build the MoE ``config`` describes into ``out_dir`` (weights, config.json, the base model's
    tokenizer, the config as ``mergekit_moe_config.yml``, a model card).

    Everything is checked before anything is read or written (RecipeError lists every problem);
    ``dry_run`` stops there. An existing ``out_dir`` is refused unless ``force``; the output
    appears only complete. ``device`` is where the base model computes hidden states for the
    ``hidden`` gate modes (in ``router_dtype``); ``seed`` seeds random routers and expert noise.
    """
    from merge_engine.io.stream import PlannedTensor
    from merge_engine.io.writer import OutputWriter, model_card, tokenizer_files

    start = time.perf_counter()
    with ExitStack() as stack:
        plan = prepare_moe(config, stack, allow_same_experts=allow_same_experts, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
        if dry_run:
            return MoEResult(None, len(plan.tensors), time.perf_counter() - start, plan.arch.name)
        where = pick_device(device)
        compute_dtype = torch_dtype(router_dtype)
        with OutputWriter(out_dir, shard_size=shard_size, force=force) as writer:
            rows = router_rows(plan, device=where, dtype=compute_dtype, seed=seed,
                               trust_remote_code=trust_remote_code)
            writer.plan([PlannedTensor(t.name, t.shape, plan.out_dtype) for t in plan.tensors])
            total = len(plan.tensors)
            for i, (name, tensor) in enumerate(output_tensors(plan, rows, seed), 1):
                writer.add(name, tensor)
                if progress is not None:
                    progress(i, total)
            writer.write_json("config.json", plan.out_config)
            writer.copy_files(plan.base_dir, tokenizer_files(plan.base_dir))
            text = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False,
                                  allow_unicode=True)
            writer.write_text(CONFIG_COPY, text)
            inputs = [str(r) for r in plan.readers]
            writer.write_text("README.md", model_card(text, inputs, f"moe ({plan.arch.name})"))
            writer.publish()
        return MoEResult(Path(out_dir), total, time.perf_counter() - start, plan.arch.name, _warnings(plan, rows))


class MoEBuilder:
    """Builds MoEs in memory, one config after another (a search's candidates), without files.

    Lifecycle: construct (``device`` resolved now) -> :meth:`build` any number of times -> close
    (or leave the ``with`` block). Across builds the model readers stay open, the base model
    used for the hidden gate modes stays loaded on ``device``, and each prompt list's hidden
    states are computed once. Each build checks its config as the disk build does and gives the
    same bits as :func:`build_moe` for the same config, ``seed`` and device type.
    """

    def __init__(self, *, device: str | None = "auto", router_dtype: str = DEFAULT_ROUTER_DTYPE, seed: int = 0,
                 allow_same_experts: bool = False, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> None:
        self.device = pick_device(device)
        self.dtype = torch_dtype(router_dtype)
        self.seed = seed
        self._options = {"allow_same_experts": allow_same_experts, "allow_pickle": allow_pickle,
                         "trust_remote_code": trust_remote_code}
        self._stack = ExitStack()
        self._readers: dict = {}
        self.states: dict[Path, Any] = {}  # base model folder -> its HiddenStates

    def build(self, config: MoEConfig, *, base_tensors: Mapping[str, torch.Tensor] | None = None) -> MoEState:
        """The MoE ``config`` describes, as tensors (RecipeError, one line per problem, first).

        ``base_tensors`` (a dense merge of the non-expert weights, held in memory) replace the
        base model's tensors of the same names: the MoE is then the one ``evomerge moe`` builds
        with that merge, written to a folder, as ``base_model``. Its router rows for the hidden
        gate modes come from that merge too (run in ``router_dtype``, as a folder would be)."""
        from merge_engine.moe.router import HiddenStates, model_from_tensors

        plan = prepare_moe(config, self._stack, opened=self._readers, **self._options)
        if base_tensors is not None:
            base = plan.config.base_model
            # the MLPs stay the base model's own: an expert may be the base model itself
            shared = {n: t for n, t in base_tensors.items() if ".mlp." not in n}
            plan.readers = {**plan.readers, base: _Overlay(plan.readers[base], shared)}
        states = None
        if config.gate_mode.startswith("hidden") and base_tensors is not None:
            model = model_from_tensors(plan.base_dir, base_tensors, device=self.device, dtype=self.dtype)
            states = HiddenStates(plan.base_dir, plan.tokenizer, device=self.device, dtype=self.dtype, model=model)
        elif config.gate_mode.startswith("hidden"):
            states = self.states.get(plan.base_dir)
            if states is None:
                states = self.states[plan.base_dir] = HiddenStates(
                    plan.base_dir, plan.tokenizer, device=self.device, dtype=self.dtype,
                    trust_remote_code=self._options["trust_remote_code"])
        rows = router_rows(plan, device=self.device, dtype=self.dtype, seed=self.seed, states=states)
        if base_tensors is not None and states is not None:
            states.close()  # that merge's model is used once
        # tensors read from a file are private mappings of it, valid after the readers close
        state = dict(output_tensors(plan, rows, self.seed))
        return MoEState(plan.out_config, state, plan.base_dir, plan.arch.name, _warnings(plan, rows))

    def close(self) -> None:
        for states in self.states.values():
            states.close()
        self._stack.close()

    def __enter__(self) -> MoEBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_moe_in_memory(config: MoEConfig, *, device: str | None = "auto",
                        router_dtype: str = DEFAULT_ROUTER_DTYPE, seed: int = 0, allow_same_experts: bool = False,
                        allow_pickle: bool = False, trust_remote_code: bool = False) -> MoEState:
    """The tensors :func:`build_moe` would write, as a dict (no file written), with the same
    checks; the same bits as the disk build for the same arguments. For many builds over the same
    models, keep a :class:`MoEBuilder`."""
    with MoEBuilder(device=device, router_dtype=router_dtype, seed=seed, allow_same_experts=allow_same_experts,
                    allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) as builder:
        return builder.build(config)


class _Overlay:
    """A checkpoint reader whose tensors named in ``tensors`` come from memory instead (copied
    on read, so the MoE never shares storage with the model they were taken from)."""

    def __init__(self, reader: Any, tensors: Mapping[str, torch.Tensor]) -> None:
        self._reader = reader
        self._tensors = tensors

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._tensors:
            return self._reader.get(name, device=device, dtype=dtype)
        tensor = self._tensors[name].detach()
        return tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def __contains__(self, name: object) -> bool:
        return name in self._reader


def load_moe_model(built: MoEState, *, device: str | torch.device = "cpu"):
    """A transformers model of ``built`` (its state loaded the way a checkpoint on disk is: experts
    converted to the installed transformers' module layout), in eval mode on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(built.config)
    cfg = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model_class = AutoModelForCausalLM._model_mapping[type(cfg)]
    model = model_class.from_pretrained(None, config=cfg, state_dict=built.state, dtype=settings.get("dtype"))
    return model.to(device).eval()
