"""Write an in-memory MoE build into a resident transformers model of the same shape, in place.

A search builds one MoE per candidate. Loading each as a new model costs a model construction;
when the candidate has the same architecture, expert count and settings as the resident model
(only its weights and top-k differ), its tensors are copied into the resident parameters instead:

    model = load_moe_model(built)              # once (or whenever write_moe_into says False)
    if not write_moe_into(model, built_next):  # False: another shape; nothing was written
        model = load_moe_model(built_next)

The checkpoint keeps one tensor per expert (``...experts.E.w1.weight``); transformers 5 holds the
experts of a layer fused (``mlp.experts.gate_up_proj`` [E, 2I, H]: gate rows then up rows, and
``mlp.experts.down_proj`` [E, H, I]) and renames Mixtral's ``block_sparse_moe`` to ``mlp``. The
mapping below covers both layouts (fused, or per-expert modules under the checkpoint's names) and
is checked in full before anything is written: every checkpoint tensor lands on one parameter
slice of its shape and every parameter is covered, else nothing is written.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from merge_engine.moe.build import MoEState

_EXPERT = re.compile(r"^(?P<layer>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
                     r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_GATE_UP = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}  # row half of gate_up_proj
#: config keys a resident model may differ in and still take a build in place
_IN_PLACE_KEYS = ("num_experts_per_tok",)
_IGNORED_KEYS = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")


def _target(params: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> tuple[str, Any] | None:
    """(parameter name, index into it) where checkpoint tensor ``name`` lives, or None."""
    for candidate in (name, name.replace(".block_sparse_moe.", ".mlp.")):
        if candidate in params and tuple(params[candidate].shape) == shape:
            return candidate, ...
    m = _EXPERT.match(name)
    if m is None:
        return None
    e, proj = int(m["e"]), m["proj"]
    if proj in _GATE_UP:
        fused = f"{m['layer']}.mlp.experts.gate_up_proj"
        if fused not in params or params[fused].dim() != 3:
            return None
        half = params[fused].shape[1] // 2
        index = (e, slice(half * _GATE_UP[proj], half * (_GATE_UP[proj] + 1)))
    else:
        fused = f"{m['layer']}.mlp.experts.down_proj"
        if fused not in params or params[fused].dim() != 3:
            return None
        index = (e,)
    if e >= params[fused].shape[0] or tuple(params[fused][index].shape) != shape:
        return None
    return fused, index


def write_moe_into(model: Any, built: MoEState) -> bool:
    """Copy ``built``'s tensors into ``model`` (made by :func:`~merge_engine.moe.build.load_moe_model`)
    and set its top-k; False (nothing written) when ``built`` has another architecture, expert
    count or setting, i.e. when it needs a model of its own."""
    from transformers import AutoConfig

    settings = dict(built.config)
    # compared as the config class normalises them (e.g. sliding_window None -> 0)
    wanted = AutoConfig.for_model(settings.pop("model_type"), **settings).to_dict()
    resident = model.config.to_dict()
    if any(resident.get(k) != v for k, v in wanted.items() if k not in _IN_PLACE_KEYS + _IGNORED_KEYS):
        return False
    params = dict(model.named_parameters())
    placed: list[tuple[str, Any, torch.Tensor]] = []
    covered: dict[str, int] = {}
    for name, tensor in built.state.items():
        target = _target(params, name, tuple(tensor.shape))
        if target is None:
            return False
        placed.append((*target, tensor))
        covered[target[0]] = covered.get(target[0], 0) + tensor.numel()
    if any(covered.get(n, 0) != p.numel() for n, p in params.items()):
        return False  # a parameter the build does not fill (another layout)
    with torch.no_grad():
        for name, index, tensor in placed:
            params[name][index].copy_(tensor)
    top_k = int(built.config["num_experts_per_tok"])
    old = model.config.num_experts_per_tok
    model.config.num_experts_per_tok = top_k
    for module in model.modules():  # the MoE blocks and routers keep their own copy of top-k
        if getattr(module, "top_k", None) == old:
            module.top_k = top_k
    return True
