"""Data-flow search: the layer path a token takes through the source models' layers.

A space with a ``layer_path:`` block searches *which layers run, in which order* (the data-flow
half of Sakana's evolutionary model merge, arXiv 2403.13187) instead of merge parameters:

    layer_path: {repeats: 2, window: 1, max_layers: 12, scale: [0.5, 2.0]}

The layers of every model (``base_model`` first, then ``models``, each in its own order) are laid
out in one sequence, repeated ``repeats`` times: ``T = (sum of layer counts) * repeats`` slots.
One boolean gene per slot (``slot_031.use``; with ``window: W`` one gene per W consecutive slots,
``slots_028_031.use``) says whether the token passes through it; the path is the used slots in
order. When the path moves from a layer of model ``a`` to one of model ``b`` the residual stream
is multiplied by the gene ``scale.a->b`` (one per ordered pair of models, log-uniform over the
``scale`` range; ``scale: false`` leaves the stream unscaled).

A candidate is a mergekit ``passthrough`` recipe with ``slices`` (consecutive layers of one model
share a slice). The scales are folded into the weights, which mergekit's passthrough ``scale``
parameter (per source, filtered by tensor name) can express: with ``P_k`` the product of every
transition scale up to slot ``k``, the layers of slot ``k`` have the tensors that write the
residual stream (attention output and MLP down projections) multiplied by ``1/P_k``. The folded
stream is the scaled one divided by ``P_k``; each RMSNorm/LayerNorm reads it scale-free up to
epsilon (``norm(x, eps) == norm(P*x, eps*P**2)``: the fold equals the scaled path with every
norm's epsilon multiplied by ``P_k**2``, a relative change of about ``eps*(P**2-1)/(2*m)`` for
mean square ``m``, negligible when ``m >> eps``), and the final norm makes the logits agree. Embeddings and head
are never scaled, so tied embeddings stay tied. Scales must be positive (a norm is not invariant
to a sign flip). The embeddings come from the first slice's model and the final norm and head
from the last slice's, as mergekit's passthrough takes them.

Lifecycle: :class:`LayerPath` is part of a validated :class:`~evomerge.space.schema.SearchSpace`;
:func:`path_slots` reads the models' configs and headers once per process (cached);
:func:`trial_recipe` once per candidate, which rejects an empty path or one longer than
``max_layers`` with a one-line :class:`SpaceError` before any tensor is read, and records the
candidate's ``layers`` and ``params`` in the trial's user attributes (cost objectives read them).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from pydantic import Field, model_validator

from evomerge.errors import ProblemsError
from merge_engine.recipe import Frozen, MergeRecipe, parse_recipe

if TYPE_CHECKING:
    from evomerge.space.schema import SearchSpace

USE = (False, True)  # the choices of a slot gene
# Module names (their last parts) that add their output to the residual stream in the layer
# layouts we know: Llama/Mistral/Qwen, GPT-NeoX, GPT-2, OPT/BART-style.
RESIDUAL_WRITERS = ("o_proj", "down_proj", "attention.dense", "dense_4h_to_h", "attn.c_proj",
                    "mlp.c_proj", "out_proj", "fc2")
# Norms applied to a block's output before the residual add (Gemma-2/3 "sandwich" norms) would
# undo a folded scale; such layouts cannot fold one.
SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class LayerPathError(ProblemsError):
    """A layer path cannot be built (bad genes, a model layout that cannot fold scales)."""


class LayerPath(Frozen):
    """The ``layer_path:`` block of a search space (see the module docstring).

    ``scale``: ``[low, high]`` (both > 0) of the transition scale genes, or ``false`` for none.
    ``max_layers``: a path longer than this is rejected (the trial fails, the search goes on).
    """

    repeats: int = Field(default=1, ge=1)
    window: int = Field(default=1, ge=1)
    max_layers: int | None = Field(default=None, ge=1)
    scale: tuple[float, float] | None = (0.5, 2.0)

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if value is None or value is True:
            return {}
        if isinstance(value, Mapping) and value.get("scale") is False:
            return {**value, "scale": None}
        return value

    @model_validator(mode="after")
    def _positive(self) -> LayerPath:
        if self.scale is not None:
            low, high = self.scale
            if not 0 < low <= high < float("inf"):
                raise ValueError(f"layer_path.scale [{low}, {high}] must have 0 < low <= high "
                                 "(a norm is scale-invariant only for positive factors)")
        return self


@dataclass(frozen=True)
class PathSlot:
    """One place in the laid-out sequence: layer ``layer`` of model ``model`` in ``repeat``."""

    index: int
    model: str
    layer: int
    repeat: int


@dataclass(frozen=True)
class ModelShape:
    """What the path needs of one model, read from its config and headers (no tensor data)."""

    path: str
    num_layers: int
    layer_params: int       # parameters of one layer of the stack
    other_params: int       # parameters outside the stack (embeddings, final norm, head)
    writers: tuple[str, ...]  # filters naming the modules that write the residual stream
    problem: str | None     # why scales cannot be folded into this model, if they cannot


# ---------------------------------------------------------------- the space's rules
def layer_path_problems(space: SearchSpace) -> list[str]:
    """What a layer-path space may not set (one line each); models are read later, by the genome."""
    problems = []
    if space.methods != ("passthrough",):
        problems.append(f"a layer_path space merges with 'method: passthrough', got {list(space.methods)}")
    for field, unset in (("search", None), ("layer_granularity", None), ("normalize", None),
                         ("filters", ()), ("smooth", False), ("parameters", {})):
        if getattr(space, field) != unset:
            problems.append(f"{field} does not apply to a layer_path space (it searches the path, "
                            "not merge parameters); remove it")
    if any(sp.recipe is not None for sp in space.start):
        problems.append("a layer_path space starts from 'equal' (the first model as it is) or "
                        "{params: ...}, not from a recipe file")
    return problems


# ---------------------------------------------------------------- slots and genes
@functools.lru_cache(maxsize=64)
def model_shape(path: str) -> ModelShape:
    """Layer count, parameter counts and residual writers of the model at ``path`` (cached)."""
    from merge_engine.errors import MergeError
    from merge_engine.io.reader import CheckpointReader
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    try:
        with CheckpointReader(resolve_model_dir(ModelRef.parse(path))) as reader:
            return shape_of(path, reader)
    except (MergeError, ValueError, OSError) as err:
        raise LayerPathError(f"model {path} cannot be read for a layer path: {err}") from None


def shape_of(path: str, reader: Any) -> ModelShape:
    """The :class:`ModelShape` of a model read through ``reader`` (a checkpoint reader, or a
    planned stage output: names, shapes and config only)."""
    from merge_engine.layout import detect_layout

    layout = detect_layout(reader.tensor_names, reader.config)
    sizes = {n: _numel(reader.shape(n)) for n in reader.tensor_names}
    if not layout.num_layers:
        raise LayerPathError(f"model {path} has no layer stack; a layer path needs one")
    layer0 = sum(v for n, v in sizes.items() if layout.layer_of(n) == 0)
    other = sum(v for n, v in sizes.items() if layout.layer_of(n) is None)
    modules = sorted({s.rsplit(".", 1)[0] for s in layout.suffixes})
    writers = tuple(m for m in modules if m.endswith(RESIDUAL_WRITERS))
    problem = None
    if any(norm in s for s in layout.suffixes for norm in SANDWICH_NORMS):
        problem = (f"model {path} normalizes block outputs before the residual add; scales cannot "
                   "be folded into its weights: set layer_path.scale: false")
    elif not writers:
        problem = (f"model {path} has no known residual-writing module ({', '.join(RESIDUAL_WRITERS)}); "
                   "set layer_path.scale: false")
    return ModelShape(path, layout.num_layers, layer0, other, writers, problem)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def path_models(space: SearchSpace) -> list[tuple[str, ModelShape]]:
    """(name, shape) of every model in the laid-out order: base model first, then ``models``.
    With scales on, a model that cannot fold them is one :class:`LayerPathError` line here, when
    the space's genes are first listed (before the study starts)."""
    from evomerge.space.stages import stage_names, stage_read, stage_shapes

    staged = stage_names(space)
    planned = stage_shapes(space) if any(stage_read(m.model, staged) for m in space.all_models()) else {}
    # an adapter keeps its model's shapes
    out = [(m.name, planned[stage] if (stage := stage_read(m.model, staged)) else model_shape(m.model))
           for m in space.all_models()]
    bad = [shape.problem for _, shape in out if shape.problem]
    if bad and space.layer_path is not None and space.layer_path.scale is not None:
        raise LayerPathError(bad[0])
    return out


def path_slots(space: SearchSpace) -> list[PathSlot]:
    """The ``T`` slots: every model's layers in order, the whole sequence ``repeats`` times."""
    assert space.layer_path is not None
    one = [(name, layer) for name, shape in path_models(space) for layer in range(shape.num_layers)]
    return [PathSlot(r * len(one) + i, name, layer, r)
            for r in range(space.layer_path.repeats) for i, (name, layer) in enumerate(one)]


def gene_names(space: SearchSpace) -> list[tuple[str, list[PathSlot]]]:
    """(gene name, the slots it switches) in order: ``slot_031.use`` or ``slots_028_031.use``."""
    assert space.layer_path is not None
    slots, w = path_slots(space), space.layer_path.window
    width = max(3, len(str(len(slots) - 1)))
    out = []
    for a in range(0, len(slots), w):
        group = slots[a:a + w]
        label = (f"slot_{a:0{width}d}" if len(group) == 1
                 else f"slots_{a:0{width}d}_{group[-1].index:0{width}d}")
        out.append((f"{label}.use", group))
    return out


def scale_genes(space: SearchSpace) -> list[tuple[str, str, str]]:
    """(gene name, from model, to model) for every ordered pair of distinct models."""
    assert space.layer_path is not None
    if space.layer_path.scale is None:
        return []
    names = [m.name for m in space.all_models()]
    return [(f"scale.{a}->{b}", a, b) for a in names for b in names if a != b]


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Every gene of the layer path, by name."""
    assert space.layer_path is not None
    dists: dict[str, BaseDistribution] = {n: CategoricalDistribution(USE) for n, _ in gene_names(space)}
    if space.layer_path.scale is not None:
        low, high = space.layer_path.scale
        dists.update({n: FloatDistribution(low, high, log=True) for n, _, _ in scale_genes(space)})
    return dists


def identity_params(space: SearchSpace, model: str | None = None) -> dict[str, Any]:
    """Genes of the path through ``model``'s own layers once (default: the first model), scales 1
    (clipped into range): the start point that reproduces that model."""
    model = model or space.all_models()[0].name
    params: dict[str, Any] = {}
    for name, group in gene_names(space):
        params[name] = all(s.model == model and s.repeat == 0 for s in group)
    for name, dist in distributions(space).items():
        if isinstance(dist, FloatDistribution):
            params[name] = min(max(1.0, dist.low), dist.high)
    return params


# ---------------------------------------------------------------- genes → path → recipe
def path_of(space: SearchSpace, values: Mapping[str, Any]) -> list[tuple[PathSlot, float]]:
    """The used slots in order, each with its residual factor ``1/P_k`` (see the module docstring).

    Raises :class:`LayerPathError` (one line) for an empty path or one over ``max_layers``.
    """
    assert space.layer_path is not None
    used = [s for name, group in gene_names(space) if bool(values[name]) for s in group]
    if not used:
        raise LayerPathError("the layer path is empty (every slot gene is off); a candidate needs "
                             "at least one layer")
    limit = space.layer_path.max_layers
    if limit is not None and len(used) > limit:
        raise LayerPathError(f"the layer path has {len(used)} layers, over max_layers {limit}; "
                             "the candidate is rejected")
    out, product, prev = [], 1.0, None
    for slot in used:
        if prev is not None and slot.model != prev.model and space.layer_path.scale is not None:
            product *= float(values[f"scale.{prev.model}->{slot.model}"])
        out.append((slot, 1.0 / product))
        prev = slot
    return out


def build_recipe(space: SearchSpace, values: Mapping[str, Any]) -> MergeRecipe:
    """The passthrough ``slices`` recipe of the path ``values`` choose (pure but for cached headers)."""
    path = path_of(space, values)
    shapes = dict(path_models(space))
    paths = {m.name: m.model for m in space.all_models()}
    runs: list[list[tuple[PathSlot, float]]] = []
    for slot, factor in path:
        last = runs[-1][-1] if runs else None
        if last is not None and last[0].model == slot.model and last[0].layer + 1 == slot.layer \
                and last[1] == factor:
            runs[-1].append((slot, factor))
        else:
            runs.append([(slot, factor)])
    slices = []
    for run in runs:
        slot, factor = run[0]
        piece: dict[str, Any] = {"sources": [{"model": paths[slot.model],
                                              "layer_range": [slot.layer, slot.layer + len(run)]}]}
        if factor != 1.0:  # a slice-level filtered scale, the form mergekit's parity run covers
            piece["parameters"] = {"scale": [*({"filter": w, "value": factor} for w in shapes[slot.model].writers),
                                             {"value": 1.0}]}
        slices.append(piece)
    data = {"merge_method": "passthrough", "slices": slices, "dtype": space.dtype, "seed": space.seed}
    return parse_recipe(data, source=f"search space {space.name}")


def path_cost(space: SearchSpace, recipe: MergeRecipe) -> dict[str, int]:
    """``layers`` and ``params`` (parameter count) of the model ``recipe`` builds."""
    from merge_engine.io.refs import ModelRef

    paths = {m.name: m.model for m in space.all_models()}
    shapes = {ModelRef.parse(paths[name]): shape for name, shape in path_models(space)}
    slices = recipe.slices or ()
    layers = sum(sl.num_layers for sl in slices)
    first = shapes[slices[0].sources[0].model] if slices else next(iter(shapes.values()))
    params = first.other_params + sum(shapes[sl.sources[0].model].layer_params * sl.num_layers
                                      for sl in slices)
    return {"layers": layers, "params": params}


def trial_recipe(space: SearchSpace, trial: Any) -> MergeRecipe:
    """Suggest every gene of ``trial``, build its recipe, record ``layers``/``params`` user attrs."""
    values: dict[str, Any] = {}
    for name, dist in distributions(space).items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    recipe = build_recipe(space, values)
    for key, value in path_cost(space, recipe).items():
        trial.set_user_attr(key, value)
    return recipe
