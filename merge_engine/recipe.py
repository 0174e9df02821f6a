"""The merge recipe: mergekit's YAML schema as frozen pydantic models, plus ``seed``.

A recipe is parsed once, never mutated, and dumped back to YAML that mergekit
accepts. Parameter values are resolved per output tensor by :func:`resolve`
following mergekit's precedence: source → slice → top level → method default.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      ValidationError, field_validator, model_validator)

from merge_engine.dtypes import canonical_dtype_name
from merge_engine.errors import RecipeError, validation_problems
from merge_engine.io.refs import ModelRef


def _parse_ref(value: Any) -> Any:
    if isinstance(value, ModelRef):
        return value
    if isinstance(value, str):
        return ModelRef.parse(value)
    if isinstance(value, Mapping) and "model" in value:
        # mergekit's long form: {model: {path, revision}, lora: ...}
        inner = value["model"]
        if isinstance(inner, Mapping):
            return ModelRef(path=str(inner["path"]), revision=inner.get("revision"),
                            lora=(value.get("lora") or {}).get("path") if isinstance(value.get("lora"), Mapping) else value.get("lora"))
        return ModelRef.parse(str(inner))
    raise ValueError(f"a model reference must be a string like 'org/name@rev', got {value!r}")


Ref = Annotated[ModelRef, BeforeValidator(_parse_ref), PlainSerializer(str, return_type=str)]

Scalar = Union[bool, int, float, str]
Gradient = list[Union[float, int, bool]]


class Frozen(BaseModel):
    """Base of every config model (engine and search side): immutable, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class FilterEntry(Frozen):
    """One entry of a filtered setting: applies when ``filter`` is a substring of the tensor name."""

    filter: str | None = None
    value: Union[bool, int, float, list[Union[bool, int, float]]]


Setting = Union[Scalar, list[FilterEntry], Gradient]
Parameters = dict[str, Setting]


def _check_setting(name: str, value: Any) -> None:
    if isinstance(value, list):
        if not value:
            raise ValueError(f"parameter {name} is an empty list; give a number, a gradient or filters")
        for v in value:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                raise ValueError(f"parameter {name} holds {v}; values must be finite")
            if isinstance(v, FilterEntry):
                _check_setting(name, v.value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"parameter {name} is {value}; values must be finite")


class _HasParameters(Frozen):
    parameters: Parameters | None = None

    @field_validator("parameters")
    @classmethod
    def _finite(cls, params: Parameters | None) -> Parameters | None:
        for name, value in (params or {}).items():
            _check_setting(name, value)
        return params


class InputModel(_HasParameters):
    """``models:`` entry: a model spanning all layers, with per-model parameters."""

    model: Ref


class SliceSource(_HasParameters):
    """One source of an output slice: layers ``[start, end)`` of ``model``."""

    model: Ref
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, rng: tuple[int, int]) -> tuple[int, int]:
        start, end = rng
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(rng)} must be [start, end) with 0 <= start < end")
        return rng


class Slice(_HasParameters):
    """An output slice: the layers its sources produce, merged, stacked in order.

    ``base_model`` (as mergekit-evolve writes it) replaces the recipe's base for this slice's
    tensors, and for the embeddings (first slice) and the head and final norm (last slice)."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: Ref | None = None

    @model_validator(mode="after")
    def _same_length(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must cover the same number of layers, got "
                             + ", ".join(f"{s.model}{list(s.layer_range)}" for s in self.sources))
        return self

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


class Module(_HasParameters):
    """``modules.<name>``: one module of a multi-module model (mergekit's names, e.g.
    ``text_decoder``, ``vision_tower``), merged from ``models`` or ``slices`` like a whole recipe;
    its ``parameters`` rank between the slice's and the recipe's."""

    models: list[InputModel] | None = None
    slices: list[Slice] | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> Module:
        if bool(self.models) == bool(self.slices):
            raise ValueError("a module gives exactly one of 'models' or 'slices', non-empty")
        return self


class ModelTokenSource(Frozen):
    """A token's row taken from row ``token_id`` (or token ``token``'s row) of ``model``."""

    kind: Literal["model_token"]
    model: Ref
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source names exactly one of 'token_id' or 'token'")
        return self


class ZeroSource(Frozen):
    """A token's row set to zeros."""

    kind: Literal["zero"]


class TokenSetting(Frozen):
    """``tokenizer.tokens.<token>``: where the token's embedding/head rows come from; ``force``
    applies it to every model, also those that have the token."""

    source: Union[ModelTokenSource, ZeroSource, Ref, None] = Field(default=None, union_mode="left_to_right")
    force: bool = False


class TokenizerSettings(Frozen):
    """The ``tokenizer:`` block; its source defaults to ``union``, as in mergekit."""

    source: Union[Literal["base", "union"], Ref] = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeRecipe(_HasParameters):
    """A whole merge recipe (mergekit YAML + our ``seed``)."""

    merge_method: str
    base_model: Ref | None = None
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, Module] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Union[Literal["base", "union"], Ref, None] = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    seed: int = 0
    name: str | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return canonical_dtype_name(value)

    @model_validator(mode="after")
    def _one_layout(self) -> MergeRecipe:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'models', 'slices' or 'modules', got "
                             + (", ".join(given) if given else "neither"))
        for key, what in (("models", "model"), ("slices", "slice"), ("modules", "module")):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ValueError(f"'{key}' is empty; list at least one {what}")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("'tokenizer' and 'tokenizer_source' are mutually exclusive; keep one")
        return self

    # ------------------------------------------------------------------ views
    def referenced_models(self) -> list[ModelRef]:
        """Every model the recipe reads, base first when given, without duplicates."""
        seen: dict[ModelRef, None] = {}
        if self.base_model is not None:
            seen[self.base_model] = None
        for _, models, slices, _ in self.input_lists():
            for m in models or ():
                seen[m.model] = None
            for s in slices or ():
                if s.base_model is not None:
                    seen[s.base_model] = None
                for src in s.sources:
                    seen[src.model] = None
        return list(seen)

    def input_lists(self) -> list[tuple[str, list[InputModel] | None, list[Slice] | None, Parameters | None]]:
        """``(where, models, slices, module parameters)`` of the recipe (where ``""``), or of each
        module of a ``modules`` recipe (where ``modules.NAME.``)."""
        if self.modules is not None:
            return [(f"modules.{n}.", m.models, m.slices, m.parameters) for n, m in self.modules.items()]
        return [("", self.models, self.slices, None)]

    def base_of(self, sl: Slice | None) -> ModelRef | None:
        """The base model of output slice ``sl`` (None: of a ``models`` recipe): its own, else the recipe's."""
        return sl.base_model if sl is not None and sl.base_model is not None else self.base_model

    def tokenizer_source_setting(self) -> ModelRef | Literal["base", "union"] | None:
        """The output tokenizer's source: None when the recipe sets neither ``tokenizer_source``
        nor ``tokenizer`` (the base's tokenizer files are copied, rows cropped as before)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def tokenizer_model(self) -> ModelRef:
        """The model whose tokenizer the output's starts from: the named source, else the base
        (or first model), which ``union`` extends."""
        src = self.tokenizer_source_setting()
        if isinstance(src, ModelRef):
            return src
        return self.base_model or self.referenced_models()[0]

    def to_dict(self) -> dict[str, Any]:
        data = _model_first(self.model_dump(mode="json", exclude_none=True))
        return {k: data[k] for k in _KEY_ORDER if k in data}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def _model_first(obj: Any) -> Any:
    """Put ``model``/``sources`` keys first in nested entries, as hand-written recipes do."""
    if isinstance(obj, list):
        return [_model_first(v) for v in obj]
    if isinstance(obj, dict):
        first = [k for k in ("model", "sources", "layer_range") if k in obj]
        return {k: _model_first(obj[k]) for k in first + [k for k in obj if k not in first]}
    return obj


_KEY_ORDER = ("name", "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
              "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "seed")


# ---------------------------------------------------------------- loading
def parse_recipe(data: Any, *, source: str = "recipe") -> MergeRecipe:
    """Build a recipe from parsed YAML; every schema problem is reported in one RecipeError."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: expected a mapping with 'merge_method', got {type(data).__name__}")
    try:
        return MergeRecipe.model_validate(dict(data))
    except ValidationError as err:
        raise RecipeError([f"{source}: {p}" for p in validation_problems(err)]) from None


# ---------------------------------------------------------------- loading files
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(value: Any, variables: Mapping[str, str], missing: Callable[[str], Exception]) -> Any:
    """Replace ``${NAME}`` in every string of ``value`` (nested lists and dicts too), from
    ``variables`` then the environment; an unset name raises ``missing(name)``. Recipes, search
    spaces and ablation grids share this one implementation (committed files name their models
    as ``${ZOO}/base``)."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key in variables:
                return str(variables[key])
            if key in os.environ:
                return os.environ[key]
            raise missing(key)
        return VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_vars(v, variables, missing) for v in value]
    if isinstance(value, dict):
        return {k: expand_vars(v, variables, missing) for k, v in value.items()}
    return value


def read_yaml_documents(path: str | Path) -> list[Any]:
    """The YAML documents of ``path`` (``---`` separates them; empty ones dropped); a missing,
    malformed or binary file raises RecipeError. Single and multi-stage recipes read files here."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist; check the path")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{path} is not valid YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file; give a YAML recipe") from None
    return docs


def unset_variable(path: str | Path) -> Callable[[str], RecipeError]:
    """The error :func:`expand_vars` raises for a ``${NAME}`` of recipe file ``path`` that is unset."""
    def unset(name: str) -> RecipeError:
        return RecipeError(f"{path}: ${{{name}}} is not set; pass --var {name}=VALUE or export {name}=...")
    return unset


def load_recipe(path: str | Path, variables: Mapping[str, str] | None = None) -> MergeRecipe:
    """Read a one-document recipe YAML file (``${NAME}`` expanded from ``variables``, then the
    environment); a missing, malformed or invalid file, an unset name, or a multi-stage file
    (several documents: :func:`merge_engine.stages.load_stages` reads those) raises RecipeError."""
    docs = read_yaml_documents(path)
    if len(docs) > 1:
        raise RecipeError(f"{path} holds {len(docs)} recipes (a multi-stage recipe); merge it with "
                          "`evomerge merge`, or keep one document where one recipe is expected")
    data = docs[0] if docs else None
    return parse_recipe(expand_vars(data, variables or {}, unset_variable(path)), source=str(path))
