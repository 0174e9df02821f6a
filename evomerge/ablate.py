"""Ablation grids: fixed merge recipes and their parents, scored on one task set, as one table.

A grid YAML names the parent models, the eval sets (presets or task lists) and a list of named
mergekit recipes that refer to parents by their short names (see ``ablations/*.yaml``).
:func:`run_grid` scores every row (each parent, each recipe) and writes, under ``out_dir``:

    rows/<row>.yaml      the recipe of a merge row, with resolved model paths (mergekit YAML)
    rows/<row>.json      the row's scores per eval set, fingerprint, versions, timing (atomic write)
    eval/<set>.yaml      each eval set's full EvalConfig
    table.csv, table.md, table.png   models as rows, tasks as columns, an average column

Lifecycle of a run: load and validate the grid (:func:`load_grid`, :func:`validate_grid`) →
skip rows whose ``rows/<row>.json`` carries the current fingerprint (recipe or model + eval
settings) → score the rest → write the table from every finished row. An interrupted run
therefore resumes where it stopped, and a changed recipe or eval setting re-scores only the
rows it affects.

Every cell equals ``evomerge merge rows/<row>.yaml OUT`` followed by
``evomerge eval OUT --preset eval/<set>.yaml``: merges are applied in memory to a resident copy of
the recipe's reference model, loaded in the dtype the merged directory would load in (same
tensors, config, tokenizer and generation config); a merge whose output config differs from its
reference model's (a cropped vocabulary, a layer stack of another depth) or that sets a chat
template goes through disk instead. Parents are loaded from their directories, as
``evomerge eval`` does.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from evomerge.errors import EvomergeError
from evomerge.evaluate.config import EvalConfig, load_preset
from evomerge.evaluate.result import EvalResult, weighted_score
from evomerge.space.load import VAR, expand_vars as _expand
from merge_engine.errors import MergeError, RecipeError
from merge_engine.recipe import Frozen, MergeRecipe, parse_recipe

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_VAR = VAR
# Config keys that differ between a merged directory and its reference model without changing
# the network (the dtype is chosen separately when the resident model is loaded).
_VOLATILE_CONFIG_KEYS = frozenset({"torch_dtype", "dtype", "transformers_version", "_name_or_path"})


class GridError(EvomergeError):
    """A grid file is invalid. ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: list[str] | str, source: str = "grid") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = self.problems[0] if len(self.problems) == 1 else \
            f"{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(f"{source}: {head}")


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
def expand_vars(value: Any, variables: Mapping[str, str]) -> Any:
    """Replace ``${NAME}`` in every string, from ``variables`` then the environment."""
    return _expand(value, variables, lambda key:
                   GridError(f"${{{key}}} is not set; pass --var {key}=VALUE or export {key}"))


def grid_variables(path: str | Path) -> list[str]:
    """Names of the ``${VAR}`` placeholders a grid file uses."""
    return sorted(set(_VAR.findall(Path(path).read_text())))


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
        out["slices"] = [{**s, "sources": [{**src, "model": ref(src.get("model"))}
                                           if isinstance(src, Mapping) else src
                                           for src in s.get("sources") or []]}
                         if isinstance(s, Mapping) else s for s in out["slices"]]
    if out.get("tokenizer_source") not in (None, "base", "union"):
        out["tokenizer_source"] = ref(out["tokenizer_source"])
    return out


def _recipes(raw: Any, names: Mapping[str, str], base_dir: Path | None,
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
            data = yaml.safe_load(path.read_text())
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
    data = expand_vars(dict(data), variables or {})
    problems: list[str] = []
    unknown = sorted(set(data) - {"name", "description", "parents", "eval", "recipes", "model_configs"})
    if unknown:
        problems.append(f"unknown keys {unknown}; use name, description, parents, eval, recipes, "
                        "model_configs")
    parents = _parents(data.get("parents"), base_dir, problems)
    names = {p.name: p.model for p in parents}
    evals = _eval_sets(data.get("eval"), base_dir, problems)
    recipes = _recipes(data.get("recipes"), names, base_dir, problems)
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
    from evomerge.model_configs import validate_with_configs
    from merge_engine.validate import Report, validate_recipe

    problems: list[str] = []
    warnings: list[str] = []
    readers: dict[str, Any] = {}
    for p in grid.parents:
        if config_only:
            if p.model not in grid.model_configs and not Path(p.model).expanduser().is_dir():
                problems.append(f"parent {p.name}: {p.model} is neither a local directory nor listed "
                                "in model_configs; bundle its config.json")
        else:
            problems += [f"parent {p.name}: {e}" for e in _resolve_problems(p.model, allow_pickle)]
    for r in grid.recipes:
        report = (validate_with_configs(r.recipe, grid.model_configs, readers=readers) if config_only
                  else validate_recipe(r.recipe, allow_pickle=allow_pickle))
        problems += [f"recipe {r.name}: {text}" for text in report.problems]
        warnings += [f"recipe {r.name}: {text}" for text in report.warnings]
    if check_tasks:
        from evomerge.evaluate.validate import validate_eval_config

        for e in grid.evals:
            problems += [f"eval set {e.name}: {text}" for text in validate_eval_config(e.config)]
    return Report(problems, warnings)


def _resolve_problems(model: str, allow_pickle: bool) -> list[str]:
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    try:
        resolve_model_dir(ModelRef.parse(model), allow_pickle=allow_pickle)
    except (MergeError, ValueError) as err:
        return [str(err)]
    return []


# ---------------------------------------------------------------- running
@dataclass
class AblationRun:
    """What :func:`run_grid` did: rows scored now, rows reused from disk, rows that failed."""

    out_dir: Path
    evaluated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def run_grid(grid: Grid, out_dir: str | Path, *, device: str = "cpu",
             evaluators: Mapping[str, Any] | None = None, allow_pickle: bool = False,
             log: Callable[[str], None] | None = None) -> AblationRun:
    """Score every unfinished row of ``grid`` and write the table (see the module docstring).

    ``evaluators`` (by eval set name) replace the ones built from the grid; they need only
    ``evaluate(model_or_dir, tokenizer=None) -> EvalResult`` and ``close()``. A row that fails
    (a bad merge, NaN weights) is logged and left unfinished; the others go on.
    """
    log = log or (lambda text: None)
    out = Path(out_dir)
    run = AblationRun(out)
    write_provenance(grid, out)
    rows = grid.rows()
    todo = []
    for row in rows:
        if load_row(out, row.name, grid.fingerprint(row)) is not None:
            run.skipped.append(row.name)
        else:
            todo.append(row)
    if run.skipped:
        log(f"{len(run.skipped)} row(s) already scored: {', '.join(run.skipped)}")
    with _Bench(grid, device, evaluators, out, allow_pickle) as bench:
        for i, row in enumerate(todo, 1):
            start = time.perf_counter()
            try:
                results, mode = bench.parent(row) if row.kind == "parent" else bench.merge(row)
            except (MergeError, EvomergeError) as err:
                run.failed[row.name] = str(err)
                log(f"[{i}/{len(todo)}] {row.name}: FAILED: {err}")
                continue
            seconds = time.perf_counter() - start
            save_row(out, grid, row, results, mode=mode, device=device, seconds=seconds)
            run.evaluated.append(row.name)
            avg = weighted_score([t for r in results.values() for t in r.tasks])
            log(f"[{i}/{len(todo)}] {row.name}: avg {avg:.4f} ({mode}, {seconds:.1f}s)")
    run.files = write_table(grid, out)
    return run


class _Bench:
    """Evaluators (built once per run) and the resident model merges are applied to.

    Lifecycle: built by :func:`run_grid`; :meth:`parent` / :meth:`merge` once per unfinished row
    (parents first, so at most one large model plus the evaluators' wrapper is alive);
    :meth:`close` at the end.
    """

    def __init__(self, grid: Grid, device: str, evaluators: Mapping[str, Any] | None,
                 out_dir: Path, allow_pickle: bool = False) -> None:
        self.grid = grid
        self.allow_pickle = allow_pickle
        self.device = device
        self.out_dir = out_dir
        self._given = dict(evaluators or {})
        self._built: dict[str, Any] = {}
        self._resident: tuple[tuple[str, str], Any, Any] | None = None  # key, model, merger
        self._tokenizers: dict[str, Any] = {}

    def evaluator(self, es: EvalSet) -> Any:
        if es.name in self._given:
            return self._given[es.name]
        if es.name not in self._built:
            from evomerge.evaluate.base import make_evaluator

            self._built[es.name] = make_evaluator(es.config, device=self.device)
        return self._built[es.name]

    # -- parents: loaded from their directories, exactly as `evomerge eval` does
    def parent(self, row: Row) -> tuple[dict[str, EvalResult], str]:
        from merge_engine.io.refs import ModelRef
        from merge_engine.io.resolve import resolve_model_dir

        path = resolve_model_dir(ModelRef.parse(row.model), allow_pickle=self.allow_pickle)
        results = {}
        for es in self.grid.evals:
            results[es.name] = self.evaluator(es).evaluate(path)
            self._release(es)
        return results, "load"

    # -- merges: in memory when the resident model can hold the output, else through disk
    def merge(self, row: Row) -> tuple[dict[str, EvalResult], str]:
        from merge_engine.io.resolve import resolve_model_dir
        from merge_engine.merge import prepare

        recipe = row.recipe
        with ExitStack() as stack:
            # every recipe problem, before any tensor is read
            plan, _ = prepare(recipe, stack, allow_pickle=self.allow_pickle)
        ref_dir = resolve_model_dir(plan.reference)
        in_memory = (_same_network(plan.config, ref_dir)
                     and recipe.chat_template in (None, "auto")
                     and all(e.config.backend == "hf" for e in self.grid.evals))
        if not in_memory:
            return self._through_disk(row), "disk"
        tok_dir = resolve_model_dir(recipe.tokenizer_model())
        results = {}
        for es in self.grid.evals:
            dtype = es.config.dtype if es.config.dtype != "auto" else plan.config.get("torch_dtype", "auto")
            model, merger = self._resident_for(ref_dir, plan.config, str(dtype), tok_dir)
            merger.apply(recipe)  # only tensors whose node changed since the last row are rewritten
            results[es.name] = self.evaluator(es).evaluate(model, self._tokenizer(tok_dir))
        return results, "in-memory"

    def _through_disk(self, row: Row) -> dict[str, EvalResult]:
        from merge_engine.merge import run_merge

        with tempfile.TemporaryDirectory(dir=self.out_dir, prefix=f".merge-{row.name}-") as tmp:
            model_dir = Path(tmp) / "model"
            run_merge(row.recipe, model_dir, device=self.device, allow_pickle=self.allow_pickle)
            results = {}
            for es in self.grid.evals:
                results[es.name] = self.evaluator(es).evaluate(model_dir)
                self._release(es)
        return results

    def _resident_for(self, ref_dir: Path, config: Mapping[str, Any], dtype: str,
                      tok_dir: Path) -> tuple[Any, Any]:
        from evomerge.evaluate.hf import load_model_dir
        from merge_engine.apply import InMemoryMerger

        # Keyed by network, not by folder: chat and Llama-2-7B load the same resident model.
        key = (_network_key(config), dtype)
        if self._resident is None or self._resident[0] != key:
            self._drop_resident()
            model, _ = load_model_dir(ref_dir, dtype=dtype, device=self.device)
            # Sources are re-read per row rather than cached: a grid has a handful of recipes,
            # and caching three 7B parents would need ~40 GB of RAM.
            self._resident = (key, model, InMemoryMerger(model, device=self.device, cache_sources=False,
                                                         allow_pickle=self.allow_pickle))
        _, model, merger = self._resident
        # A merged directory carries the tokenizer source's generation_config.json (or none).
        model.generation_config = _generation_config(tok_dir, model.config)
        return model, merger

    def _tokenizer(self, tok_dir: Path) -> Any:
        if str(tok_dir) not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[str(tok_dir)] = AutoTokenizer.from_pretrained(tok_dir)
        return self._tokenizers[str(tok_dir)]

    def _release(self, es: EvalSet) -> None:
        # HFEvaluator keeps its lm-eval wrapper (and so the model it last scored) until the next
        # call; a loaded parent is not needed again, so let it go before the next one loads.
        if es.name in self._built and es.config.backend == "hf":
            self._built[es.name].close()
        gc.collect()

    def _drop_resident(self) -> None:
        if self._resident is not None:
            self._resident[2].close()
            self._resident = None
            for es in self.grid.evals:
                self._release(es)

    def close(self) -> None:
        self._drop_resident()
        for ev in self._built.values():
            ev.close()
        self._built.clear()

    def __enter__(self) -> _Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _network_key(config: Mapping[str, Any]) -> str:
    """The config without keys that do not change the network (dtype, versions, names)."""
    return json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}, sort_keys=True)


def _same_network(config: Mapping[str, Any], ref_dir: Path) -> bool:
    return _network_key(config) == _network_key(json.loads((ref_dir / "config.json").read_text()))


def _generation_config(tok_dir: Path, model_config: Any) -> Any:
    from transformers import GenerationConfig

    if (tok_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(tok_dir)
    return GenerationConfig.from_model_config(model_config)


# ---------------------------------------------------------------- persistence
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_provenance(grid: Grid, out_dir: Path) -> None:
    """``eval/<set>.yaml`` and ``rows/<merge>.yaml``: what re-runs any row alone."""
    for es in grid.evals:
        _atomic_write(out_dir / "eval" / f"{es.name}.yaml",
                      yaml.safe_dump(es.config.model_dump(mode="json"), sort_keys=False))
    for r in grid.recipes:
        _atomic_write(out_dir / "rows" / f"{r.name}.yaml", r.recipe.to_yaml())


def reproduce_commands(grid: Grid, row: Row, out_dir: Path) -> list[str]:
    """Shell commands that score ``row`` alone (one ``evomerge eval`` per eval set)."""
    from merge_engine.io.resolve import looks_local

    if row.kind == "parent":  # `evomerge eval` takes a directory; `hf download` prints the cached one
        model = row.model if looks_local(row.model) else f'"$(hf download {row.model})"'
        cmds = []
    else:
        model = f"/tmp/evomerge-{grid.name}-{row.name}"
        cmds = [f"evomerge merge {out_dir / 'rows' / (row.name + '.yaml')} {model}"]
    return cmds + [f"evomerge eval {model} --preset {out_dir / 'eval' / (es.name + '.yaml')}"
                   for es in grid.evals]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("evomerge", "torch", "transformers", "lm_eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def save_row(out_dir: Path, grid: Grid, row: Row, results: Mapping[str, EvalResult], *,
             mode: str, device: str, seconds: float) -> Path:
    """Persist one finished row atomically (temp file + rename): a crash never leaves half a row."""
    record = {
        "name": row.name, "kind": row.kind, "fingerprint": grid.fingerprint(row),
        "model": row.model, "recipe_file": None if row.recipe is None else f"rows/{row.name}.yaml",
        "seed": None if row.recipe is None else row.recipe.seed,
        "evals": {name: r.to_dict() for name, r in results.items()},
        "mode": mode, "device": device, "seconds": round(seconds, 3), "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reproduce": reproduce_commands(grid, row, out_dir),
    }
    path = out_dir / "rows" / f"{row.name}.json"
    _atomic_write(path, json.dumps(record, indent=2) + "\n")
    return path


def load_row(out_dir: Path, name: str, fingerprint: str) -> dict[str, dict[str, Any]] | None:
    """The finished row's results by eval set, or None if absent, unreadable or stale."""
    path = Path(out_dir) / "rows" / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    return record.get("evals")


# ---------------------------------------------------------------- the table
def build_table(grid: Grid, out_dir: Path):  # -> pandas.DataFrame
    """Finished rows × task values, plus ``avg`` (and ``avg_<set>`` with several eval sets).

    ``avg`` is the weighted score of all tasks (Σ w·v / Σ|w|: the plain mean with unit weights).
    Rows not finished yet are left out. Column names are task names; ``df.attrs["metrics"]``
    maps each to the metric it shows.
    """
    import pandas as pd

    records, metrics = [], {}
    for row in grid.rows():
        evals = load_row(out_dir, row.name, grid.fingerprint(row))
        if evals is None:
            continue
        line: dict[str, Any] = {"model": row.name, "kind": row.kind}
        every = []
        for es in grid.evals:
            scores = EvalResult.from_dict(evals[es.name]).tasks
            every += scores
            for t in scores:
                line[t.task] = t.value
                metrics[t.task] = t.metric
            if len(grid.evals) > 1:
                line[f"avg_{es.name}"] = weighted_score(scores)
        line["avg"] = weighted_score(every)
        records.append(line)
    df = pd.DataFrame(records)
    df.attrs["metrics"] = metrics
    return df


def write_table(grid: Grid, out_dir: Path) -> dict[str, Path]:
    """``table.csv``, ``table.md`` and ``table.png`` from the finished rows (none if no row is)."""
    df = build_table(grid, out_dir)
    if df.empty:
        return {}
    files = {"csv": out_dir / "table.csv", "md": out_dir / "table.md", "png": out_dir / "table.png"}
    _atomic_write(files["csv"], df.to_csv(index=False, float_format="%.6g"))
    _atomic_write(files["md"], markdown_table(grid, df))
    plot_table(grid, df, files["png"])
    return files


def _value_columns(df) -> list[str]:
    return [c for c in df.columns if c not in ("model", "kind")]


def markdown_table(grid: Grid, df) -> str:
    """A Markdown table; the best value of each column is bold (higher is better)."""
    cols = _value_columns(df)
    metrics = df.attrs.get("metrics", {})
    head = ["model"] + [f"{c} ({metrics[c].split(',')[0]})" if c in metrics else c for c in cols]
    lines = [f"# {grid.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    best = {c: df[c].max() for c in cols}
    for _, r in df.iterrows():
        cells = [r["model"] + (" *(parent)*" if r["kind"] == "parent" else "")]
        for c in cols:
            v = r[c]
            text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
            cells.append(f"**{text}**" if text and v == best[c] and len(df) > 1 else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each merge row's recipe is `rows/<model>.yaml`; each eval set is `eval/<set>.yaml`; "
              "`rows/<model>.json` holds the scores, stderrs, versions and the commands that re-run it."]
    return "\n".join(lines) + "\n"


def plot_table(grid: Grid, df, path: Path) -> None:
    """Grouped bars: one group per task (and average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _value_columns(df)
    n = len(df)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cols) * max(1, n) * 0.45 + 2), 4.2))
    for i, (_, r) in enumerate(df.iterrows()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [r[c] for c in cols], width, label=r["model"],
               hatch="//" if r["kind"] == "parent" else None, edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title(grid.name)
    ax.legend(fontsize="small", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
