"""Running a grid: score every unfinished row on every eval set, then write the table.

:func:`ablate` is the one entry point of ``evomerge ablate``: load the grid file, check it, and
(unless only checking, or a problem was found) run it with :func:`run_grid`.

Lifecycle of a run: :func:`run_grid` writes the provenance files → skips rows whose
``rows/<row>.json`` carries the current fingerprint (recipe or model + eval settings) → scores
the rest on a :class:`_Bench` → writes the table from every finished row. An interrupted run
therefore resumes where it stopped, and a changed recipe or eval setting re-scores only the rows
it affects.

Every cell equals ``evomerge merge rows/<row>.yaml OUT`` followed by
``evomerge eval OUT --preset eval/<set>.yaml``: merges are applied in memory to a resident
:class:`~evomerge.candidate.Candidate` built from the recipe's reference model, loaded in the
dtype the merged directory would load in (same tensors, config, tokenizer and generation
config); a merge whose output config differs from its reference model's (a cropped vocabulary, a
layer stack of another depth) or that sets a chat template goes through disk instead. Parents are
loaded from their directories, as ``evomerge eval`` does.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.ablate.grid import EvalSet, Grid, Row, grid_variables, load_grid, validate_grid
from evomerge.ablate.table import load_row, save_row, write_provenance, write_table
from evomerge.errors import EvomergeError
from evomerge.evaluate import EvalConfig, EvalResult, backend, weighted_score
from merge_engine.errors import MergeError

if TYPE_CHECKING:  # torch is imported only when a merge row runs
    from evomerge.candidate import Candidate
    from merge_engine.recipe import MergeRecipe

# Config keys that differ between a merged directory and its reference model without changing
# the network (the dtype is chosen separately when the resident model is loaded).
_VOLATILE_CONFIG_KEYS = frozenset({"torch_dtype", "dtype", "transformers_version", "_name_or_path"})

DEFAULT_OUT = Path("results/ablations")  # a grid's default output folder is DEFAULT_OUT/<grid name>


@dataclass
class AblationRun:
    """What :func:`run_grid` did: rows scored now, rows reused from disk, rows that failed."""

    out_dir: Path
    evaluated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Ablation:
    """What :func:`ablate` did: the grid as loaded, its validation ``report`` (``.problems``,
    ``.warnings``), and the ``run`` (None when only checking or when the report has problems)."""

    grid: Grid
    report: Any  # merge_engine.validate.Report
    run: AblationRun | None = None


def ablate(path: str | Path, out_dir: str | Path | None = None, *,
           variables: Mapping[str, str] | None = None,
           default_variables: Mapping[str, Callable[[], str]] | None = None,
           limit: int | float | None = None, device: str = "cpu", allow_pickle: bool = False,
           validate_only: bool = False, check_tasks: bool = True,
           log: Callable[[str], None] | None = None) -> Ablation:
    """Load the grid at ``path`` (``${VAR}`` from ``variables``, the environment, or else
    ``default_variables[VAR]()``, called only for a variable the grid uses and nothing else sets,
    e.g. a zoo built on demand), replace every eval set's ``limit`` when given, check it
    (:func:`~evomerge.ablate.grid.validate_grid`; ``validate_only`` checks recipes against
    bundled configs, no weights) and, unless only checking or a problem was found, score it into
    ``out_dir`` (default ``DEFAULT_OUT/<grid name>``) with :func:`run_grid`. File problems raise
    :class:`~evomerge.ablate.grid.GridError`; recipe, model and task problems are in the report."""
    import os

    chosen = dict(variables or {})
    wanted = grid_variables(path) if Path(path).is_file() and default_variables else []
    for name, make in (default_variables or {}).items():
        if name in wanted and name not in chosen and name not in os.environ:
            chosen[name] = make()
    grid = load_grid(path, chosen)
    if limit is not None:
        grid = grid.with_limit(limit)
    report = validate_grid(grid, config_only=validate_only, check_tasks=check_tasks,
                           allow_pickle=allow_pickle)
    if validate_only or report.problems:
        return Ablation(grid, report)
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT / grid.name
    return Ablation(grid, report, run_grid(grid, out, device=device, allow_pickle=allow_pickle, log=log))


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
        self._resident: tuple[tuple[str, str], Candidate] | None = None  # network key, model
        self._tokenizers: dict[str, Any] = {}

    def evaluator(self, es: EvalSet) -> Any:
        if es.name in self._given:
            return self._given[es.name]
        if es.name not in self._built:
            from evomerge.evaluate import make_evaluator

            self._built[es.name] = make_evaluator(es.config, device=self.device)
        return self._built[es.name]

    # -- parents: loaded from their directories, exactly as `evomerge eval` does
    def parent(self, row: Row) -> tuple[dict[str, EvalResult], str]:
        from merge_engine.io.refs import ModelRef
        from merge_engine.io.resolve import loadable_model_dir

        path = loadable_model_dir(ModelRef.parse(row.model), allow_pickle=self.allow_pickle)
        results = {}
        for es in self.grid.evals:
            results[es.name] = self.evaluator(es).evaluate(path)
            self._release(es)
        return results, "load"

    # -- merges: in memory when the resident model can hold the output, else through disk
    def merge(self, row: Row) -> tuple[dict[str, EvalResult], str]:
        from merge_engine.io.resolve import resolve_model_dir
        from merge_engine.session import prepare

        recipe = row.recipe
        with ExitStack() as stack:
            # every recipe problem, before any tensor is read
            plan, _ = prepare(recipe, stack, allow_pickle=self.allow_pickle)
        ref_dir = resolve_model_dir(plan.reference)
        in_memory = (_same_network(plan.config, ref_dir)
                     and _keeps_tokenizer_template(recipe)
                     and all(backend(e.config.backend).scores_resident_model for e in self.grid.evals))
        if not in_memory:
            return self._through_disk(row), "disk"
        tok_dir = resolve_model_dir(recipe.tokenizer_model())
        results = {}
        for es in self.grid.evals:
            dtype = es.config.dtype if es.config.dtype != "auto" else plan.config.get("torch_dtype", "auto")
            candidate = self._resident_for(ref_dir, plan.config, str(dtype), tok_dir, es.config)
            candidate.apply(recipe)  # only tensors whose node changed since the last row are rewritten
            results[es.name] = self.evaluator(es).evaluate(candidate.model, self._tokenizer(tok_dir))
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
                      tok_dir: Path, eval_cfg: EvalConfig) -> Candidate:
        from evomerge.candidate import Candidate
        from evomerge.devices import placement

        # Keyed by network, not by folder: chat and Llama-2-7B load the same resident model; and
        # by the eval set's memory plan (device_map, quantized scoring place it differently).
        key = (_network_key(config), dtype, placement(eval_cfg, self.device))
        if self._resident is None or self._resident[0] != key:
            self._drop_resident()
            # Sources are re-read per row rather than cached: a grid has a handful of recipes,
            # and caching three 7B parents would need ~40 GB of RAM.
            self._resident = (key, Candidate.load(ref_dir, dtype=dtype, device=self.device,
                                                  cache_sources=False, allow_pickle=self.allow_pickle,
                                                  eval_cfg=eval_cfg))
        candidate = self._resident[1]
        # A merged directory carries the tokenizer source's generation_config.json (or none).
        candidate.model.generation_config = _generation_config(tok_dir, candidate.model.config)
        return candidate

    def _tokenizer(self, tok_dir: Path) -> Any:
        if str(tok_dir) not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[str(tok_dir)] = AutoTokenizer.from_pretrained(tok_dir)
        return self._tokenizers[str(tok_dir)]

    def _release(self, es: EvalSet) -> None:
        # Some evaluators (HF) keep the model they last scored until the next call; a loaded
        # parent is not needed again, so let it go before the next one loads.
        if es.name in self._built and backend(es.config.backend).keeps_last_model:
            self._built[es.name].close()
        gc.collect()

    def _drop_resident(self) -> None:
        if self._resident is not None:
            self._resident[1].close()
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


def _keeps_tokenizer_template(recipe: MergeRecipe) -> bool:
    """Whether the merged directory's chat template is its tokenizer source's own (the resident
    model scores with that tokenizer; any other template goes through disk)."""
    from merge_engine.chat_templates import output_template, shipped_template
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    if not isinstance(recipe.tokenizer_model(), ModelRef):
        return False  # a built tokenizer (union): the merged directory's own, through disk
    chosen = output_template(recipe.chat_template, list(recipe.referenced_models()), resolve_model_dir)
    return chosen is None or chosen == shipped_template(resolve_model_dir(recipe.tokenizer_model()))


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
