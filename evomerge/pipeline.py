"""Search pipelines: several searches in one command, each searching over the best merge of those
before it (e.g. Sakana's parameter space then data flow).

A pipeline file holds search spaces as YAML documents joined by ``---`` (the shape of a
mergekit-multi recipe file), in the order they run. Each space has its own ``name``; a model of a
later space whose path is an earlier space's name reads that space's best merge:

    name: params                       # stage 1: a parameter-space merge
    models: [{name: math, model: ${ZOO}/math}, {name: code, model: ${ZOO}/code}]
    method: [ties, dare_ties]
    ...
    ---
    name: path                         # stage 2: a layer path over stage 1's merge and the sources
    models: [{name: merged, model: params}, {name: math, model: ${ZOO}/math}]
    method: passthrough
    layer_path: {repeats: 2, max_layers: 8}
    ...

Each stage is one Optuna study, named by its space, in one storage (default
``OUT/pipeline.db``); its results go to ``OUT/<name>/`` as ``evomerge search`` writes them. When
a stage ends, ``OUT/<name>/stages.yaml`` holds its best candidate as a multi-stage recipe (the
earlier stages it read included, its own final stage named after it); a later stage reads that
file as its fixed ``stages`` (:mod:`evomerge.space.stages`), so each earlier best merge is
computed once per run, in memory. ``OUT/final.yaml`` is the last stage's best candidate: a
multi-stage recipe ``evomerge merge`` turns into the model that was scored.

Resuming: a stage whose ``stages.yaml`` exists is done and is not run again (a new ``OUT``
searches it afresh); an unfinished stage resumes its study where it stopped.

Lifecycle: :func:`load_pipeline` checks every space before anything runs (later spaces against
a stand-in for the earlier stages' results: their start candidates); :func:`run_pipeline` runs
the stages in order.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError, atomic_write
from evomerge.space import SpaceError, SearchSpace, parse_space
from evomerge.space.stages import read_by_final
from merge_engine.errors import MergeError
from merge_engine.stages import Stage, load_stages, stages_yaml

RESULT = "stages.yaml"  # a finished stage's best candidate, in OUT/<stage>/
FINAL = "final.yaml"    # the pipeline's result, in OUT/
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class PipelineError(SpaceError):
    """A pipeline file is invalid (every problem, one line each)."""


@dataclass(frozen=True)
class PipelineStage:
    """One space of a pipeline: its name, its YAML mapping (as written) and the earlier
    stages its models read."""

    name: str
    data: dict[str, Any]
    needs: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    path: Path
    stages: tuple[PipelineStage, ...]
    variables: Mapping[str, str]

    def space(self, stage: PipelineStage, fixed: Path | None) -> SearchSpace:
        """``stage``'s space, reading the earlier stages' best merges from recipe file ``fixed``."""
        data = dict(stage.data)
        if stage.needs:
            data["stages"] = str(fixed)
        return parse_space(data, source=f"{self.path} stage {stage.name}",
                           base_dir=self.path.parent.resolve(), variables=self.variables)


def load_pipeline(path: str | Path, variables: Mapping[str, str] | None = None) -> Pipeline:
    """Read and check a pipeline file: the file's shape first, then every space (see the module
    docstring); raises :class:`PipelineError` listing the problems before anything runs."""
    from evomerge.space.load import read_space_text

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file {path} does not exist; check the path", "pipeline")
    try:
        docs = [d for d in yaml.safe_load_all(read_space_text(path)) if d is not None]
    except yaml.YAMLError as err:
        raise PipelineError(f"not valid YAML: {str(err).splitlines()[0]}; fix the syntax",
                            str(path)) from None
    problems: list[str] = []
    stages: list[PipelineStage] = []
    for i, doc in enumerate(docs, 1):
        name = doc.get("name") if isinstance(doc, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"document {i}: a pipeline stage is a search space with a 'name' (letters, "
                            f"digits, '_', '-'; it names the study and the stage), got {name!r}")
            continue
        if name in {s.name for s in stages}:
            problems.append(f"stage {name}: the name is used twice; give each stage its own name")
        if "stages" in doc:
            problems.append(f"stage {name}: a pipeline sets 'stages' itself (earlier stages are read "
                            "by name); remove it")
        entries = [doc.get("base_model"), *(doc.get("models") or [])]
        refs = [m.get("model") if isinstance(m, dict) else m for m in entries]
        needs = tuple(dict.fromkeys(r for r in refs if r in {s.name for s in stages}))
        stages.append(PipelineStage(name, dict(doc), needs))
    if not docs:
        problems.append("no search space in the file; give one YAML document per stage")
    if problems:
        raise PipelineError(problems, str(path))
    pipeline = Pipeline(path, tuple(stages), dict(variables or {}))
    _check_spaces(pipeline)
    return pipeline


def _check_spaces(pipeline: Pipeline) -> None:
    """Parse every space, later ones over a stand-in for the earlier results (each earlier
    stage's first start candidate), so a typo in the last stage is found before the first runs."""
    import optuna

    from evomerge.space import equal_params
    from evomerge.space.genome import trial_stages

    problems: list[str] = []
    lora_dtypes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-pipeline-check-") as tmp:
        fixed: Path | None = None
        for stage in pipeline.stages:
            try:
                space = pipeline.space(stage, fixed)
                if space.lora_merge_dtype is not None:
                    lora_dtypes[stage.name] = space.lora_merge_dtype
                stand_in = trial_stages(space, optuna.trial.FixedTrial(equal_params(space)))
            except (EvomergeError, MergeError) as err:  # a bad space, or a recipe it cannot build
                lines = getattr(err, "problems", None) or [str(err)]
                problems.extend(f"stage {stage.name}: {p}" for p in lines)
                break  # later stages read this one
            fixed = Path(tmp) / f"{stage.name}.yaml"
            fixed.write_text(stages_yaml(named(stand_in, stage.name)))
    if len(set(lora_dtypes.values())) > 1:  # final.yaml is merged with one --lora-merge-dtype
        given = ", ".join(f"{name}: {dtype}" for name, dtype in lora_dtypes.items())
        problems.append(f"stages set different lora_merge_dtype ({given}); final.yaml is merged with one "
                        "--lora-merge-dtype: set the same value in every stage that sets one")
    if problems:
        raise PipelineError(problems, str(pipeline.path))


def reproduce_line(pipeline: Pipeline) -> str:
    """The comment heading ``final.yaml``: the command that rebuilds the pipeline's best merge
    (with the ``lora_merge_dtype`` a stage's space sets, one value for all: ``_check_spaces``)."""
    dtypes = {d for d in (stage.data.get("lora_merge_dtype") for stage in pipeline.stages) if d}
    option = f" --lora-merge-dtype {dtypes.pop()}" if dtypes else ""
    return f"# reproduce: evomerge merge {FINAL} OUT_DIR{option}\n"


def named(stages: list[Stage], name: str | None) -> list[Stage]:
    """``stages`` with the final stage named ``name`` (None: unnamed, the file's final stage)."""
    *upstream, final = read_by_final(stages)
    return [*upstream, Stage(name, final.recipe.model_copy(update={"name": name}), final.needs)]


@dataclass
class PipelineSummary:
    out_dir: Path
    storage: str
    final: Path
    ran: list[str]        # stages searched by this call
    skipped: list[str]    # stages already done (their stages.yaml exists)


def run_pipeline(pipeline: Pipeline, out_dir: Path, *, storage: str | None = None, device: str = "cpu",
                 placeholders: Mapping[str, str] | None = None, progress: Callable[..., None] | None = None,
                 log: Callable[[str], None] | None = None,
                 evaluators: Mapping[str, Mapping[str, Any]] | None = None) -> PipelineSummary:
    """Run (or resume) every stage in order; returns where the results are. ``evaluators``
    (stage name -> ``run_search``'s evaluators) replaces the real ones of those stages."""
    import optuna

    from evomerge.results.store import top_trials, trial_stages_of
    from evomerge.search.run import RunOptions, run_search

    say = log or (lambda text: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out_dir / 'pipeline.db').absolute()}"
    fixed: Path | None = None
    ran, skipped = [], []
    for i, stage in enumerate(pipeline.stages):
        result = out_dir / stage.name / RESULT
        if result.is_file():
            say(f"stage {stage.name}: done ({result}); not run again")
            skipped.append(stage.name)
            fixed = result
            continue
        space = pipeline.space(stage, fixed)
        say(f"stage {i + 1}/{len(pipeline.stages)}: {stage.name}")
        options = RunOptions(out_dir=out_dir / stage.name, storage=storage, study_name=stage.name,
                             device=device, placeholders=dict(placeholders or {}))
        run_search(space, options, progress=progress, log=log,
                   evaluators=(evaluators or {}).get(stage.name))
        best = top_trials(optuna.load_study(study_name=stage.name, storage=storage), 1)
        if not best:
            raise EvomergeError(f"stage {stage.name} has no completed trial (see {out_dir / stage.name}"
                                "/trials.csv); fix the cause and run the pipeline again to resume it")
        atomic_write(result, stages_yaml(named(trial_stages_of(best[0]), stage.name)))
        ran.append(stage.name)
        fixed = result
    atomic_write(out_dir / FINAL, reproduce_line(pipeline) + stages_yaml(named(load_stages(fixed), None)))
    return PipelineSummary(out_dir, storage, out_dir / FINAL, ran, skipped)
