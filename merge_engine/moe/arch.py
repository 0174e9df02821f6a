"""The output architectures an MoE build can write, as data: which dense models they take, their
config.json, and the checkpoint names of their routers and experts.

Checkpoints are written in the layout the hub's own models of each architecture use (Mixtral:
``block_sparse_moe.experts.E.w1/w2/w3``; Qwen-MoE: ``mlp.experts.E.gate_proj/...``), the one every
loader reads: transformers fuses the experts at load time, vLLM reads them as they are.

Dense MLP ``gate_proj``/``up_proj``/``down_proj`` become each expert's gate/up/down projections;
every tensor of the base model outside its MLPs is copied as is; routers are one row per expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from merge_engine.moe.config import ARCHITECTURE_NAMES, RANDOM_MODES, MoEConfig

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# keys of dense configs that mean nothing (or something else) to the MoE configs written here
_DENSE_ONLY_KEYS = ("mlp_bias", "pretraining_tp", "architectures", "auto_map", "_name_or_path",
                    "transformers_version")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class OutputArch:
    """One output architecture. Names take the layer index ``i`` and expert index ``e``."""

    name: str
    input_types: tuple[str, ...]
    shared_experts: int  # how many shared experts it needs (0: none allowed)
    model_type: str
    class_name: str
    moe_keys: Callable[[dict[str, Any], int, int], dict[str, Any]]
    router: str  # format string with {i}
    expert: str  # format string with {i}, {e}, {proj} (the output projection name)
    projection_names: tuple[str, str, str]  # output names of gate, up, down
    shared: str | None = None  # format string with {i}, {proj}
    shared_gate: str | None = None  # format string with {i}
    qkv_bias: bool = False  # writes q/k/v biases (zeros where the base has none)
    attention_biases: tuple[str, ...] = ()  # projections whose biases a base may bring

    def problem(self, config: MoEConfig, model_types: Sequence[str]) -> str | None:
        """Why this architecture cannot be built from ``config`` and models of ``model_types``
        (base, experts, shared experts), or None."""
        shared = config.shared_experts or []
        if len(shared) != self.shared_experts:
            want = "no shared experts" if not self.shared_experts else f"exactly {self.shared_experts} shared expert"
            return f"{self.name} output takes {want}, the config has {len(shared)}"
        if shared and config.gate_mode not in RANDOM_MODES and not all(e.positive_prompts for e in shared):
            return f"{self.name} output needs positive_prompts for its shared expert (or gate_mode: random)"
        odd = sorted({t for t in model_types if t not in self.input_types})
        if odd:
            return (f"{self.name} output is built from {' or '.join(self.input_types)} models, "
                    f"not {', '.join(odd)}")
        return None

    def config(self, base: dict[str, Any], num_experts: int, experts_per_token: int,
               dtype: str | None) -> dict[str, Any]:
        """The output config.json from the base model's: its settings plus the MoE's."""
        dropped = _DENSE_ONLY_KEYS + (() if "o_proj" in self.attention_biases else ("attention_bias",))
        out = {k: v for k, v in base.items() if k not in dropped}
        out.update(model_type=self.model_type, architectures=[self.class_name])
        out.update(self.moe_keys(base, num_experts, experts_per_token))
        if dtype is not None:
            out["dtype"] = dtype
            out.pop("torch_dtype", None)
        return out

    def expert_name(self, layer: int, expert: int, source_proj: str) -> str:
        proj = self.projection_names[MLP_PROJECTIONS.index(source_proj)]
        return self.expert.format(i=layer, e=expert, proj=proj)


def _mixtral_keys(base: dict[str, Any], n: int, k: int) -> dict[str, Any]:
    return {"num_local_experts": n, "num_experts_per_tok": k, "sliding_window": None}


def _qwen2_moe_keys(base: dict[str, Any], n: int, k: int) -> dict[str, Any]:
    inter = base["intermediate_size"]
    return {"num_experts": n, "num_experts_per_tok": k, "decoder_sparse_step": 1, "norm_topk_prob": True,
            "sliding_window": None, "use_sliding_window": False, "mlp_only_layers": [], "qkv_bias": True,
            "moe_intermediate_size": inter, "shared_expert_intermediate_size": inter}


def _qwen3_moe_keys(base: dict[str, Any], n: int, k: int) -> dict[str, Any]:
    return {"num_experts": n, "num_experts_per_tok": k, "decoder_sparse_step": 1, "norm_topk_prob": True,
            "mlp_only_layers": [], "moe_intermediate_size": base["intermediate_size"]}


ARCHITECTURES: tuple[OutputArch, ...] = (
    OutputArch("Mixtral", ("llama", "mistral"), 0, "mixtral", "MixtralForCausalLM", _mixtral_keys,
               router="model.layers.{i}.block_sparse_moe.gate.weight",
               expert="model.layers.{i}.block_sparse_moe.experts.{e}.{proj}.weight",
               projection_names=("w1", "w3", "w2")),
    OutputArch("Qwen MoE", ("llama", "mistral", "qwen2"), 1, "qwen2_moe", "Qwen2MoeForCausalLM",
               _qwen2_moe_keys,
               router="model.layers.{i}.mlp.gate.weight",
               expert="model.layers.{i}.mlp.experts.{e}.{proj}.weight",
               projection_names=MLP_PROJECTIONS,
               shared="model.layers.{i}.mlp.shared_expert.{proj}.weight",
               shared_gate="model.layers.{i}.mlp.shared_expert_gate.weight", qkv_bias=True,
               attention_biases=("q_proj", "k_proj", "v_proj")),
    OutputArch("Qwen3 MoE", ("qwen3",), 0, "qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_keys,
               router="model.layers.{i}.mlp.gate.weight",
               expert="model.layers.{i}.mlp.experts.{e}.{proj}.weight",
               projection_names=MLP_PROJECTIONS, attention_biases=ATTENTION_PROJECTIONS),
)
assert tuple(a.name for a in ARCHITECTURES) == ARCHITECTURE_NAMES


def select_architecture(config: MoEConfig, model_types: Sequence[str]) -> OutputArch:
    """The output architecture for ``config``: the one it names (a name prefix, as mergekit), else
    the first of :data:`ARCHITECTURES` that can be built (Mixtral first, as mergekit).

    Raises ValueError (one line: every candidate's reason) when none fits. All models must be of
    one model_type, as every architecture copies MLPs tensor for tensor."""
    kinds = sorted(set(model_types))
    if len(kinds) > 1:
        raise ValueError(f"the base model and experts are of different architectures ({', '.join(kinds)}); "
                         "build an MoE from models of one architecture")
    wanted = config.architecture
    candidates = [a for a in ARCHITECTURES if wanted is None or a.name.lower().startswith(wanted.lower())]
    reasons = []
    for arch in candidates:
        reason = arch.problem(config, model_types)
        if reason is None:
            return arch
        reasons.append(reason)
    raise ValueError("no output architecture fits: " + "; ".join(reasons))
