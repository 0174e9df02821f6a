"""The grid file: its schema, loading (``${VAR}`` placeholders, short forms, parent names in
recipes) and validation before any weight is read.

A grid YAML names the parent models, the eval sets (presets or task lists) and a list of named
mergekit recipes that refer to parents by their short names (see ``ablations/*.yaml``).
:func:`load_grid` reports every problem of the file in one :class:`GridError`;
:func:`validate_grid` then checks the recipes against the models (or their bundled configs) and
the eval sets against lm-eval's task index.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from evomerge.errors import EvomergeError, ProblemsError
from evomerge.evaluate import EvalConfig, load_preset
from merge_engine.recipe import VAR, expand_vars as _expand
from merge_engine.errors import MergeError, RecipeError
from merge_engine.recipe import Frozen, MergeRecipe, parse_recipe

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class GridError(ProblemsError):
    """A grid file is invalid. ``problems`` lists every problem found, one line each; the message
    starts with the file (``source``)."""


# ---------------------------------------------------------------- the grid


class Parent(Frozen):
    """A parent model: its short name in recipes and the table, and where it lives.

    ``evaluate: false`` keeps it out of the table (e.g. a common base used only by TIES/DARE).
    """

    name: str
    model: str
    evaluate: bool = True


class EvalSet(Frozen):
    """One group of table columns: an EvalConfig scored as one ``evomerge eval`` call would."""

    name: str
    config: EvalConfig


class GridRecipe(Frozen):
    name: str
    recipe: MergeRecipe
    description: str | None = None


@dataclass(frozen=True)
class Row:
    """One table row: a parent (``model``) or a merge (``recipe``)."""

    name: str
    kind: Literal["parent", "merge"]
    model: str | None = None
    recipe: MergeRecipe | None = None


class Grid(Frozen):
    """A parsed, validated grid file. ``model_configs`` maps hub ids to bundled config folders."""

    name: str
    description: str | None = None
    parents: tuple[Parent, ...] = Field(min_length=1)
    evals: tuple[EvalSet, ...] = Field(min_length=1)
    recipes: tuple[GridRecipe, ...] = ()
    model_configs: dict[str, str] = Field(default_factory=dict)

    def rows(self) -> list[Row]:
        """Table rows in order: evaluated parents as listed, then recipes as listed."""
        return ([Row(p.name, "parent", model=p.model) for p in self.parents if p.evaluate]
                + [Row(r.name, "merge", recipe=r.recipe) for r in self.recipes])

    def with_limit(self, limit: int | float | None) -> Grid:
        """The same grid with every eval set's ``limit`` replaced (the ``--limit`` option)."""
        evals = tuple(EvalSet(name=e.name, config=EvalConfig.model_validate(
            {**e.config.model_dump(), "limit": limit})) for e in self.evals)
        return self.model_copy(update={"evals": evals})

    def fingerprint(self, row: Row) -> str:
        """Hash of what decides a row's scores: its model or recipe and every eval setting."""
        what = row.model if row.recipe is None else row.recipe.to_dict()
        payload = {"kind": row.kind, "what": what,
                   "evals": [[e.name, e.config.model_dump(mode="json")] for e in self.evals]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading
def expand_vars(value: Any, variables: Mapping[str, str], source: str = "grid") -> Any:
    """Replace ``${NAME}`` in every string, from ``variables`` then the environment; an unset
    name raises :class:`GridError` for ``source``."""
    return _expand(value, variables, lambda key:
                   GridError(f"${{{key}}} is not set; pass --var {key}=VALUE or export {key}", source))


def grid_variables(path: str | Path) -> list[str]:
    """Names of the ``${VAR}`` placeholders a grid file uses."""
    return sorted(set(VAR.findall(Path(path).read_text())))


def _local(path: str, base_dir: Path | None) -> str:
    """``./x``, ``../x`` and ``~/x`` are relative to the grid file, not the working directory."""
    if base_dir is not None and path.startswith(("./", "../", "~")):
        return str((base_dir / Path(path).expanduser()).resolve())
    return path


def _parents(raw: Any, base_dir: Path | None, problems: list[str]) -> list[Parent]:
    if isinstance(raw, Mapping):  # short form {name: model} or {name: {model, evaluate}}
        raw = [{"name": k, **(v if isinstance(v, Mapping) else {"model": v})} for k, v in raw.items()]
    if not isinstance(raw, list) or not raw:
        problems.append("parents: list the parent models, e.g. [{name: chat, model: org/name}]")
        return []
    out = []
    for i, entry in enumerate(raw):
        try:
            p = Parent.model_validate(entry)
            out.append(p.model_copy(update={"model": _local(p.model, base_dir)}))
        except ValidationError as err:
            problems += [f"parents[{i}]: {e['loc'][-1] if e['loc'] else ''} {e['msg']}".replace("  ", " ")
                         for e in err.errors()]
    return out


def _eval_sets(raw: Any, base_dir: Path | None, problems: list[str]) -> list[EvalSet]:
    blocks = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(blocks, list) or not blocks:
        problems.append("eval: give an eval set ({preset: NAME} or {tasks: [...]}) or a list of them")
        return []
    out = []
    for i, block in enumerate(blocks):
        if not isinstance(block, Mapping):
            problems.append(f"eval[{i}]: expected a mapping with 'preset' or 'tasks'")
            continue
        block = dict(block)
        preset = block.pop("preset", None)
        name = str(block.pop("name", preset or ("eval" if len(blocks) == 1 else f"eval{i}")))
        if isinstance(block.get("include_paths"), (str, list)):
            paths = block["include_paths"]
            block["include_paths"] = [str((base_dir / p).resolve()) if base_dir and not Path(p).is_absolute()
                                      else p for p in ([paths] if isinstance(paths, str) else paths)]
        try:
            cfg = load_preset(preset, **block) if preset else EvalConfig.model_validate(block)
            out.append(EvalSet(name=name, config=cfg))
        except (ValueError, EvomergeError) as err:  # EvalConfigError and pydantic errors
            problems.append(f"eval set {name}: {str(err).splitlines()[0]}")
    return out


def _resolve_refs(recipe: Any, names: Mapping[str, str], base_dir: Path | None) -> Any:
    """The recipe mapping with parent names replaced by their models, local paths made absolute."""
    def ref(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return names.get(value, _local(value, base_dir))

    if not isinstance(recipe, Mapping):
        return recipe
    out = dict(recipe)
    if "base_model" in out:
        out["base_model"] = ref(out["base_model"])
    if isinstance(out.get("models"), list):
        out["models"] = [{**m, "model": ref(m.get("model"))} if isinstance(m, Mapping) else m
                         for m in out["models"]]
    if isinstance(out.get("slices"), list):
        out["slices"] = [{**s, **({"base_model": ref(s["base_model"])} if "base_model" in s else {}),
                          "sources": [{**src, "model": ref(src.get("model"))}
                                      if isinstance(src, Mapping) else src
                                      for src in s.get("sources") or []]}
                         if isinstance(s, Mapping) else s for s in out["slices"]]
    if out.get("tokenizer_source") not in (None, "base", "union"):
        out["tokenizer_source"] = ref(out["tokenizer_source"])
    tok = out.get("tokenizer")
    if isinstance(tok, Mapping):  # the tokenizer block names models too: its source and token sources
        tok = dict(tok)
        if tok.get("source") not in (None, "base", "union"):
            tok["source"] = ref(tok["source"])
        if isinstance(tok.get("tokens"), Mapping):
            tok["tokens"] = {name: _token_refs(setting, ref) for name, setting in tok["tokens"].items()}
        out["tokenizer"] = tok
    return out


def _token_refs(setting: Any, ref: Any) -> Any:
    """A ``tokenizer.tokens`` entry with its model names resolved (a model, or ``model_token``)."""
    if not isinstance(setting, Mapping):
        return setting
    source = setting.get("source")
    if isinstance(source, str):
        return {**setting, "source": ref(source)}
    if isinstance(source, Mapping) and isinstance(source.get("model"), str):
        return {**setting, "source": {**source, "model": ref(source["model"])}}
    return setting


def _recipes(raw: Any, names: Mapping[str, str], base_dir: Path | None, variables: Mapping[str, str],
             problems: list[str]) -> list[GridRecipe]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append("recipes: give a list of {name, recipe} entries")
        return []
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or "name" not in entry or "recipe" not in entry:
            problems.append(f"recipes[{i}]: expected {{name: ..., recipe: {{merge_method: ...}}}}")
            continue
        unknown = sorted(set(entry) - {"name", "recipe", "description"})
        if unknown:
            problems.append(f"recipes[{i}]: unknown keys {unknown}; use name, recipe, description")
        data = entry["recipe"]
        if isinstance(data, str):  # a recipe file next to the grid
            path = (base_dir / data) if base_dir else Path(data)
            if not path.is_file():
                problems.append(f"recipe {entry['name']}: file {path} does not exist")
                continue
            try:  # the same ${VAR}s as the grid itself
                data = expand_vars(yaml.safe_load(path.read_text()), variables, str(path))
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                problems.append(f"recipe {entry['name']}: {path} is not a YAML text file "
                                f"({str(err).splitlines()[0]}); fix the file")
                continue
            except GridError as err:
                problems += err.problems
                continue
        try:
            recipe = parse_recipe(_resolve_refs(data, names, base_dir), source=f"recipe {entry['name']}")
            out.append(GridRecipe(name=str(entry["name"]), recipe=recipe,
                                  description=entry.get("description")))
        except RecipeError as err:
            problems += err.problems
    return out


def parse_grid(data: Any, *, source: str = "grid", base_dir: Path | None = None,
               variables: Mapping[str, str] | None = None) -> Grid:
    """Build a grid from parsed YAML; every problem is reported in one :class:`GridError`."""
    if not isinstance(data, Mapping):
        raise GridError("expected a mapping with 'parents', 'eval' and 'recipes'", source)
    data = expand_vars(dict(data), variables or {}, source)
    problems: list[str] = []
    unknown = sorted(set(data) - {"name", "description", "parents", "eval", "recipes", "model_configs"})
    if unknown:
        problems.append(f"unknown keys {unknown}; use name, description, parents, eval, recipes, "
                        "model_configs")
    parents = _parents(data.get("parents"), base_dir, problems)
    names = {p.name: p.model for p in parents}
    evals = _eval_sets(data.get("eval"), base_dir, problems)
    recipes = _recipes(data.get("recipes"), names, base_dir, variables or {}, problems)
    configs = {str(k): str((base_dir / v).resolve()) if base_dir and not Path(v).is_absolute() else str(v)
               for k, v in (data.get("model_configs") or {}).items()}
    raw_recipes = data.get("recipes") if isinstance(data.get("recipes"), list) else []
    row_names = [p.name for p in parents] + [str(r["name"]) for r in raw_recipes
                                             if isinstance(r, Mapping) and "name" in r]
    for n in row_names:
        if not _NAME.match(n):
            problems.append(f"name {n!r} must start with a letter and hold only letters, digits, "
                            "'_', '-' or '.' (it names files)")
    dup = sorted({n for n in row_names if row_names.count(n) > 1})
    if dup:
        problems.append(f"names {dup} are used twice among parents and recipes; give each row its own")
    tasks = [t.name for e in evals for t in e.config.tasks]
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        problems.append(f"tasks {dup} appear in several eval sets; each task is one table column")
    if problems:
        raise GridError(problems, source)
    return Grid(name=str(data.get("name") or (Path(source).stem if source != "grid" else "grid")),
                description=data.get("description"), parents=tuple(parents), evals=tuple(evals),
                recipes=tuple(recipes), model_configs=configs)


def load_grid(path: str | Path, variables: Mapping[str, str] | None = None) -> Grid:
    """Read a grid YAML (``${VAR}`` from ``variables`` or the environment)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist; check the path", str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"not valid YAML: {str(err).splitlines()[0]}; fix the syntax", str(path)) from None
    return parse_grid(data, source=str(path), base_dir=path.parent.resolve(), variables=variables)


# ---------------------------------------------------------------- validation
def validate_grid(grid: Grid, *, config_only: bool = False, check_tasks: bool = True,
                  allow_pickle: bool = False):  # -> Report
    """Every problem (and warning) of the grid, one line each, before any weight is read.

    Recipes go through the engine's validator; with ``config_only``, models listed in
    ``grid.model_configs`` are checked from their bundled ``config.json`` alone (no weights).
    ``check_tasks`` also checks each eval set against the lm-eval task index; ``allow_pickle``
    accepts models that ship only pickle (``.bin``) weights.
    """
    from merge_engine.session import validate
    from merge_engine.validate import Report

    problems: list[str] = []
    warnings: list[str] = []
    readers: dict[Any, Any] = {}  # ModelRef -> config-only reader, shared across recipes
    for p in grid.parents:
        if config_only:
            if p.model not in grid.model_configs and not Path(p.model).expanduser().is_dir():
                problems.append(f"parent {p.name}: {p.model} is neither a local directory nor listed "
                                "in model_configs; bundle its config.json")
        else:
            problems += [f"parent {p.name}: {e}" for e in _resolve_problems(p.model, allow_pickle)]
    for r in grid.recipes:
        report = (validate(r.recipe, model_configs=grid.model_configs, opened=readers) if config_only
                  else validate(r.recipe, allow_pickle=allow_pickle))
        problems += [f"recipe {r.name}: {text}" for text in report.problems]
        warnings += [f"recipe {r.name}: {text}" for text in report.warnings]
    if check_tasks:
        from evomerge.evaluate import validate_eval_config

        for e in grid.evals:
            problems += [f"eval set {e.name}: {text}" for text in validate_eval_config(e.config)]
    return Report(problems, warnings)


def _resolve_problems(model: str, allow_pickle: bool) -> list[str]:
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import loadable_model_dir

    try:
        loadable_model_dir(ModelRef.parse(model), allow_pickle=allow_pickle)
    except (MergeError, ValueError) as err:
        return [str(err)]
    return []
