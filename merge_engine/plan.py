"""Recipe → DAG: one frozen node per output tensor (load → merge), ready for the executor.

The planner reads only checkpoint headers (names, shapes, dtypes) and configs;
every problem it finds is collected so ``validate`` can report them all at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from merge_engine.devices import SourceHome, stage
from merge_engine.dtypes import dtype_name, torch_dtype
from merge_engine.errors import NonFiniteError, RecipeError
from merge_engine.layout import LayerLayout, detect_layout
from merge_engine.io.refs import ModelRef
from merge_engine.methods.registry import get_method
from merge_engine.modules import ModulePlan, module_plans
from merge_engine.native import l1 as native_l1
from merge_engine.out_config import output_config
from merge_engine.out_slices import OutSlice, Source, out_of_bounds, split_base
from merge_engine.randomness import TensorRandom
from merge_engine.recipe import MergeRecipe
from merge_engine.settings import MISSING, layer_position, resolve
from merge_engine.tokenizer import RowPlan, Vocabulary, plan_rows, recipe_vocabulary


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or inf (one reduction pass, no boolean temporary)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if (count := native_l1.nonfinite(t)) is not None:  # large bf16 CPU: one native pass over the bits
        return count == 0
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# ---------------------------------------------------------------- nodes
@dataclass(frozen=True)
class LoadTensor:
    """Read one tensor of one model (cast to ``dtype``, cropped to ``crop`` rows/cols)."""

    io: ClassVar[bool] = True
    model: ModelRef
    name: str
    dtype: str | None = None
    crop: tuple[int, ...] | None = None

    def deps(self) -> tuple:
        return ()

    def run(self, ctx: MergeContext) -> torch.Tensor:
        tensor = ctx.readers[self.model].get(self.name)
        if self.crop is not None:
            tensor = tensor[tuple(slice(0, n) for n in self.crop)]
        if self.dtype is not None:
            tensor = tensor.to(torch_dtype(self.dtype))
        return stage(tensor, ctx.device, ctx.source_home)


@dataclass(frozen=True)
class Draw:
    """Seeded random draws one model's trim of one output tensor will ask for.

    ``below`` None: ``TensorRandom(seed, out_name).uniform(shape, model_index)``; a number:
    ``.keep_mask(below, shape, model_index)`` (same values either way). An I/O-like node, so the
    executor makes it ahead on its background thread: a CPU generator is serial, and on a 1B
    model the draws of a DARE merge are a third of the single-core work. Uniform draws (DELLA's)
    are not made ahead for a CPU merge: its kernel draws row by row while it ranks, with no
    tensor of draws (None here; any other CPU path draws on the spot).
    """

    io: ClassVar[bool] = True
    seed: int
    out_name: str
    model_index: int
    shape: tuple[int, ...]
    below: float | None = None

    def deps(self) -> tuple:
        return ()

    def run(self, ctx: MergeContext) -> torch.Tensor | None:
        rng = TensorRandom(self.seed, self.out_name)
        if self.below is None:
            if torch.device(ctx.device).type == "cpu":
                return None  # see the docstring
            return rng.uniform(self.shape, self.model_index)
        return rng.keep_mask(self.below, self.shape, self.model_index)


@dataclass(frozen=True)
class MergeTensor:
    """Merge the input tensors into output tensor ``out_name`` with one method."""

    io: ClassVar[bool] = False
    out_name: str
    method: str
    inputs: tuple[LoadTensor, ...]
    base: LoadTensor | None
    params: tuple[tuple[str, Any], ...]
    seed: int
    out_dtype: str | None
    draws: tuple[Draw, ...] = ()
    vocab: RowPlan | None = None  # vocabulary tensors: inputs laid out on the output tokenizer's rows
    compute_dtype: str | None = None  # inputs of mixed dtypes are cast to this one before the method

    def loads(self) -> tuple[LoadTensor, ...]:
        """The tensors read: the inputs, then the base if any."""
        return self.inputs + ((self.base,) if self.base is not None else ())

    def deps(self) -> tuple[LoadTensor | Draw, ...]:
        return self.loads() + self.draws

    def kwargs(self) -> dict[str, Any]:
        """The method's keyword arguments (per-model parameters as lists), without ``rng``."""
        spec = get_method(self.method)
        return {spec.param(name).kwarg: list(value) if isinstance(value, tuple) else value
                for name, value in self.params}

    def run(self, ctx: MergeContext, *values: torch.Tensor) -> torch.Tensor:
        spec = get_method(self.method)
        device = ctx.device
        n_in = len(self.loads())
        if self.vocab is not None:
            values = (*self.vocab.align(values[:n_in]), *values[n_in:])
        # non_blocking: a copy from pinned memory overlaps; from pageable memory it is synchronous
        dtype = torch_dtype(self.compute_dtype) if self.compute_dtype else None
        tensors = [v.to(device, dtype, non_blocking=True) for v in values[: len(self.inputs)]]
        base = values[n_in - 1].to(device, dtype, non_blocking=True) if self.base is not None else None
        kwargs = self.kwargs()
        if spec.random:
            drawn = {(d.model_index, d.below): u for d, u in zip(self.draws, values[n_in:])
                     if u is not None}
            kwargs["rng"] = TensorRandom(self.seed, self.out_name, drawn)
        with torch.no_grad():
            out = spec.fn(tensors, base, **kwargs)
        if ctx.check_finite and not all_finite(out):
            # inputs are checked only now, to name the culprit: a clean merge pays one pass
            for node, value in zip(self.loads(), values):
                if not all_finite(value):
                    raise NonFiniteError(f"tensor {node.name} of model {node.model} holds NaN or inf; "
                                         "the checkpoint is corrupt, fix or replace it")
            raise NonFiniteError(f"the {self.method} merge produced NaN or inf in tensor "
                                 f"{self.out_name}; check the recipe's weights for that tensor")
        if self.out_dtype is not None:
            out = out.to(torch_dtype(self.out_dtype))
        return out


def output_shape_dtype(node: MergeTensor, readers: Mapping[ModelRef, Any]) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype ``node`` will produce, known from headers alone."""
    first = node.deps()[0]
    shape = first.crop or tuple(readers[first.model].shape(first.name))
    if node.vocab is not None:
        shape = (node.vocab.rows, *shape[1:])
    name = node.out_dtype or first.dtype
    dtype = torch_dtype(name) if name else readers[first.model].dtype(first.name)
    return tuple(shape), dtype


@dataclass
class MergeContext:
    """Run-time state the nodes need: open readers, the compute device, and where source tensors
    are put once read (``source_home``, see :func:`merge_engine.devices.source_home`)."""

    readers: Mapping[ModelRef, Any]
    device: torch.device | str = "cpu"
    check_finite: bool = True
    source_home: SourceHome = "cpu"


# ---------------------------------------------------------------- plan
@dataclass
class MergePlan:
    """The output of planning: ordered targets plus what the output directory needs."""

    recipe: MergeRecipe
    targets: list[MergeTensor]
    config: dict[str, Any]
    reference: ModelRef
    layout: LayerLayout
    num_layers: int
    warnings: list[str] = field(default_factory=list)
    vocabulary: Vocabulary | None = None  # the output tokenizer, when the recipe sets a source


class _Planner:
    def __init__(self, recipe: MergeRecipe, readers: Mapping[ModelRef, Any]) -> None:
        self.recipe = recipe
        self.readers = readers
        self.spec = get_method(recipe.merge_method)
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.reference = recipe.base_model or recipe.referenced_models()[0]
        self.layouts = {ref: detect_layout(r.tensor_names, r.config) for ref, r in readers.items()}
        self.layout = self.layouts[self.reference]
        self.stacks = self.layouts  # each model's layer stack in the module being planned
        self.vocabulary: Vocabulary | None = None
        self.vocab_unchecked = False  # a tokenizer source, but only configs to plan from
        if recipe.tokenizer_source_setting() is not None:
            try:
                self.vocabulary = recipe_vocabulary(recipe, readers, self.reference, self.warnings)
            except RecipeError as err:
                self.problems.extend(err.problems)
            self.vocab_unchecked = self.vocabulary is None and not self.problems

    def problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    # -- parameter resolution --------------------------------------------
    def params_for(self, tensor_name: str, t: float, sl: OutSlice,
                   inputs: list[Source]) -> tuple[tuple[str, Any], ...]:
        out: list[tuple[str, Any]] = []
        top = self.recipe.parameters
        for p in self.spec.params:
            if p.per_model:
                values = []
                for src in inputs:
                    v = resolve((src.params, sl.params, sl.module_params, top), p.name, tensor_name, t)
                    values.append(self._default(p, v, tensor_name, src.model))
                out.append((p.name, tuple(values)))
            else:
                v = resolve((sl.params, sl.module_params, top), p.name, tensor_name, t)
                out.append((p.name, self._default(p, v, tensor_name, None)))
        return tuple(out)

    def _default(self, p: Any, value: Any, tensor_name: str, model: ModelRef | None) -> Any:
        if value is MISSING:
            if p.required or p.default is None:
                whose = f" for model {model}" if model is not None else ""
                self.problem(f"{self.spec.name} needs parameter '{p.name}'{whose} (tensor "
                             f"{tensor_name} has none); set it under that model's parameters "
                             "or the top-level parameters")
                return 0.0
            return p.default
        if p.kind == "bool" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = bool(value)
        if p.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        issue = p.check(value)
        if issue:
            self.problem(f"{self.spec.name}: {issue} (tensor {tensor_name}); use a value in range")
        return value

    def _row_plan(self, out_name: str, loads: list[LoadTensor]) -> RowPlan | None:
        try:
            return plan_rows(self.vocabulary, self.recipe, [ld.model for ld in loads],
                             [self.readers[ld.model].shape(ld.name)[0] for ld in loads], out_name)
        except RecipeError as err:
            self.problems.extend(t for t in err.problems if t not in self.problems)
            return None

    def _compute_dtype(self, loads: list[LoadTensor]) -> str | None:
        """Without a recipe ``dtype``, inputs of different dtypes merge in their promoted dtype
        (bf16 with float32: float32, as mergekit promotes); None when they share one."""
        dtypes = {self.readers[ld.model].dtype(ld.name) for ld in loads}
        if self.recipe.dtype or len(dtypes) < 2 or not all(d.is_floating_point for d in dtypes):
            return None
        return dtype_name(functools.reduce(torch.promote_types, dtypes))

    # -- tensors -----------------------------------------------------------
    def source_name(self, out_name: str, out_layer: int | None, src: Source, slice_start: int) -> str:
        if out_layer is None:
            return out_name
        return self.stacks[src.model].rename(out_name, src.first_layer + out_layer - slice_start)

    def load_nodes(self, out_name: str, names: list[tuple[Source, str]],
                   base: ModelRef | None) -> list[LoadTensor] | None:
        shapes = []
        for src, name in names:
            reader = self.readers[src.model]
            if name not in reader.tensor_names:
                self.problem(f"model {src.model} has no tensor {name}; its architecture does not "
                             "match the others (or the layer_range is out of bounds)")
                return None
            shapes.append(tuple(reader.shape(name)))
        crop = None
        vocab_rows = (self.vocabulary is not None or self.vocab_unchecked) and self.layout.is_embedding(out_name)
        if len(set(shapes)) > 1 and not (vocab_rows and len({s[1:] for s in shapes}) == 1):
            crop = self._crop(out_name, names, shapes, base)
            if crop is None:
                return None
        dtype = self.recipe.dtype
        return [LoadTensor(src.model, name, dtype, crop if crop != shape else None)
                for (src, name), shape in zip(names, shapes)]

    def _crop(self, out_name: str, names: list[tuple[Source, str]], shapes: list[tuple[int, ...]],
              base: ModelRef | None) -> tuple[int, ...] | None:
        ranks = {len(s) for s in shapes}
        tails = {s[1:] for s in shapes}
        if len(ranks) > 1 or len(tails) > 1 or not self.layout.is_embedding(out_name):
            listing = ", ".join(f"{src.model}: {list(s)}" for (src, _), s in zip(names, shapes))
            self.problem(f"tensor {out_name} has different shapes across models ({listing}); "
                         "these models cannot be merged")
            return None
        if self.spec.embed_rows == "base" and base is not None:
            rows = next(s[0] for (src, _), s in zip(names, shapes) if src.model == base)
            if any(s[0] < rows for s in shapes):
                small = [str(src.model) for (src, _), s in zip(names, shapes) if s[0] < rows]
                self.problem(f"vocabulary sizes differ: {', '.join(small)} has fewer rows in {out_name} "
                             f"than the base ({rows}); use a base with the smallest vocabulary")
                return None
        else:
            rows = min(s[0] for s in shapes)
        self.warnings.append(f"vocabulary sizes differ in {out_name}; keeping the first {rows} rows")
        return (rows,) + shapes[0][1:]

    def tensor_node(self, out_name: str, sl: OutSlice, out_layer: int | None, slice_start: int,
                    t: float) -> MergeTensor | None:
        inputs, base = split_base(self.spec, sl)
        named = [(s, self.source_name(out_name, out_layer, s, slice_start)) for s in inputs]
        if base is not None:
            named.append((base, self.source_name(out_name, out_layer, base, slice_start)))
        loads = self.load_nodes(out_name, named, sl.base)
        if loads is None:
            return None
        params = self.params_for(out_name, t, sl, inputs)
        compute = self._compute_dtype(loads)
        out_dtype = self.recipe.out_dtype or self.recipe.dtype or compute
        vocab = None
        if self.vocabulary is not None and self.layout.is_embedding(out_name):
            vocab = self._row_plan(out_name, loads)
        node = MergeTensor(out_name, self.spec.name, tuple(loads[: len(inputs)]),
                           loads[-1] if base is not None else None, params,
                           self.recipe.seed, out_dtype, vocab=vocab, compute_dtype=compute)
        if self.spec.draws is None:
            return node
        shape, _ = output_shape_dtype(node, self.readers)
        draws = tuple(Draw(self.recipe.seed, out_name, i, shape, below)
                      for i, below in self.spec.draws(node.kwargs()))
        return dataclasses.replace(node, draws=draws)

    # -- whole plan ----------------------------------------------------------
    def build(self) -> MergePlan:
        try:
            modules = module_plans(self.recipe, self.readers, self.reference, self.layouts, self.warnings)
        except RecipeError as err:
            raise RecipeError(self.problems + [p for p in err.problems if p not in self.problems]) from None
        for mod in modules:
            counts = {ref: lay.num_layers for ref, lay in mod.stacks.items()}
            for text in out_of_bounds(mod.slices, counts):
                self.problem(f"modules.{mod.name}: {text}" if self.recipe.modules else text)
        if self.problems:
            raise RecipeError(self.problems)
        targets: list[MergeTensor | None] = []
        main, module_layers = (modules[0].slices, self.layout.num_layers), {}
        for mod in modules:
            out_layer = self._plan_module(mod, targets)
            if mod.reference.layout.prefix == self.layout.prefix:
                main = (mod.slices, out_layer)
            elif mod.layers_key:
                module_layers[mod.layers_key] = out_layer
        if self.problems:
            raise RecipeError(self.problems)
        done = [t for t in targets if t is not None]
        shapes = [(t.out_name, *output_shape_dtype(t, self.readers),
                   next((ld.crop[0] for ld in t.loads() if ld.crop), None)) for t in done]
        config = output_config(self.recipe, self.readers[self.reference].config, self.layout, main[1], main[0],
                               shapes, self.vocabulary.rows if self.vocabulary else None, module_layers)
        return MergePlan(self.recipe, done, config, self.reference, self.layout, main[1], self.warnings,
                         self.vocabulary)

    def _plan_module(self, mod: ModulePlan, targets: list[MergeTensor | None]) -> int:
        """Add the nodes of one module to ``targets`` (before its stack, its layers slice by slice,
        after it); returns its output layer count."""
        self.stacks, layout, slices = mod.stacks, mod.reference.layout, mod.slices
        names = list(mod.reference.names)
        non_layer = [n for n in names if layout.layer_of(n) is None]
        # each per-layer suffix, ordered as in layer 0 of the reference
        templates = sorted({layout.rename(n, 0) for n in names if layout.layer_of(n) is not None},
                           key=lambda n: names.index(n) if n in names else 0)
        post = [n for n in non_layer if mod.reference.after_stack(n, self.layout)]
        for name in non_layer:
            if name not in post:
                targets.append(self.tensor_node(name, slices[0], None, 0, mod.reference.position(name)))
        out_layer = 0
        for sl in slices:
            for i in range(sl.num_layers):
                t = layer_position(i, sl.num_layers)
                for tmpl in templates:
                    # source names are computed relative to the slice start
                    targets.append(self.tensor_node(layout.rename(tmpl, out_layer + i), sl, out_layer + i,
                                                    out_layer, t))
            out_layer += sl.num_layers
        for name in post:
            targets.append(self.tensor_node(name, slices[-1], None, 0, mod.reference.position(name)))
        return out_layer


def build_plan(recipe: MergeRecipe, readers: Mapping[ModelRef, Any]) -> MergePlan:
    """Plan the merge; raises RecipeError listing every problem found."""
    return _Planner(recipe, readers).build()
