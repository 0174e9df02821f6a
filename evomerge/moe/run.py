"""One run of an MoE search: the search's own study, loop and evaluators, with MoE candidates.

    summary = run_moe_search(load_moe_space(path, vars), RunOptions(out_dir=Path("runs/moe")))

The same lifecycle as :func:`evomerge.search.run.run_search` (checked before anything is written;
a SQLite study that resumes; one resident model; a failed candidate told FAIL, the search goes
on), with an :class:`~evomerge.moe.candidate.MoECandidate` as the resident model and each trial's
:class:`~evomerge.moe.search_space.MoERecipe` (:func:`~evomerge.moe.search_space.trial_moe_recipe`)
as its proposal. A new study first gets mergekit-moe's default build as a start point. At the
end the top-k are scored on the held-out split next to every input model, and the results are
written:

    trials.csv, report.txt, summary.json, space.yaml     as every search
    best/01_trial0007.moe.yml      the mergekit-moe config (rebuild: evomerge moe ... OUT)
    best/01_trial0007.shared.yml   the shared weights' merge, when searched (evomerge merge ...
                                   SHARED first, then evomerge moe ... --var SHARED=SHARED)
    best/01_trial0007.json         provenance (scores, seeds, versions, checkpoint sha256)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

from evomerge.errors import EvomergeError, atomic_dir
from evomerge.moe.candidate import MoECandidate
from evomerge.moe.search_space import SHARED_VAR, MoERecipe, MoESearchSpace, default_params, trial_moe_recipe
from evomerge.results.files import best_entries, portable_filter, var_options, write_results  # the same file conventions
from evomerge.results.store import top_trials
from evomerge.search.held_out import one_model_recipe
from evomerge.search.loop import Evaluators, Progress
from evomerge.search.run import RunOptions, SearchSummary, run_study, summarize
from evomerge.search.samplers import sampler_problems

DEFAULT_MOE_SAMPLER = "tpe"  # the genes are mostly categorical (experts, prompts, gate mode)


def run_moe_search(space: MoESearchSpace, options: RunOptions, *,
                   progress: Callable[[Progress], None] | None = None,
                   evaluators: dict[str, Any] | None = None,
                   log: Callable[[str], None] | None = None) -> SearchSummary:
    """Run (or resume) an MoE search and write its results to ``options.out_dir`` (arguments
    as :func:`~evomerge.search.run.run_search`)."""
    say = log or (lambda text: None)
    sampler = options.sampler or space.sampler or DEFAULT_MOE_SAMPLER
    if problems := sampler_problems(sampler, len(space.objectives)):
        raise EvomergeError(problems[0])

    def enqueue_defaults(study: optuna.Study, known: int) -> None:
        if not known:
            study.enqueue_trial(default_params(space), user_attrs={"start_point": "mergekit-moe defaults"})

    study, storage, outcome = run_study(
        space, options, sampler=sampler, evaluators=evaluators, progress=progress, say=say,
        load_candidate=lambda: MoECandidate.load(space, device=options.device),
        enqueue_start=enqueue_defaults, held_out=moe_held_out, propose=trial_moe_recipe)
    out_dir = Path(options.out_dir)
    say(f"writing results to {out_dir}")
    files = write_results(study, out_dir, options.placeholders, best=write_moe_best, plots=False)
    if options.materialize:
        say("writing the best MoE as a model")
        files["model"] = materialize_best_moe(study, out_dir / "best_model", device=options.device)
    return summarize(study, storage, out_dir, outcome, files)


def recipe_of(trial: optuna.trial.FrozenTrial) -> MoERecipe:
    """The MoE candidate a trial built."""
    return MoERecipe.from_yaml(trial.user_attrs["recipe"])


def materialize_best_moe(study: optuna.Study, out_dir: Path, *, device: str = "cpu") -> Path:
    """Write the best trial's MoE as a model directory (replacing an older one); its shared
    merge, when searched, first to ``<out_dir>_shared`` (the MoE's base model)."""
    from merge_engine.merge import run_merge
    from merge_engine.moe import build_moe, parse_moe_config

    best = top_trials(study, 1)
    if not best:
        raise EvomergeError("no completed trial to materialize; run more trials")
    recipe = recipe_of(best[0])
    config = recipe.config
    if recipe.shared is not None:
        shared_dir = out_dir.with_name(out_dir.name + "_shared")
        run_merge(recipe.shared, shared_dir, device=device, force=True)
        config = parse_moe_config({**config.model_dump(mode="json", exclude_none=True), "base_model": str(shared_dir)})
    build_moe(config, out_dir, device=device, seed=recipe.seed, force=True)
    return out_dir


def _score(model: Any, tokenizer: Any, evaluators: Mapping[str, Any]) -> dict[str, Any]:
    return {name: ev.evaluate(model, tokenizer).to_dict() for name, ev in evaluators.items()}


def moe_held_out(study: optuna.Study, space: MoESearchSpace, candidate: MoECandidate, evaluators: Evaluators,
                 log: Callable[[str], None] | None = None) -> None:
    """Score the top-k MoEs and every input model on the report split, once each (kept in the
    study's ``report``/``inputs`` user attrs, as a merge search does)."""
    if evaluators.report is None:
        return
    say = log or (lambda text: None)
    report = dict(study.user_attrs.get("report", {}))
    inputs = dict(study.user_attrs.get("inputs", {}))
    for t in [t for t in top_trials(study, space.top_k) if str(t.number) not in report]:
        say(f"held-out: trial {t.number}")
        try:
            candidate.apply(recipe_of(t))
            got = _score(candidate.model, candidate.tokenizer, {"report": evaluators.report})["report"]
        except Exception as err:  # one unscorable result must not lose the others
            got = {"error": f"{type(err).__name__}: {err}"[:2000]}
        report[str(t.number)] = got
        study.set_user_attr("report", report)
    for m in [m for m in space.all_models() if m.name not in inputs]:
        say(f"held-out: input model {m.name}")
        try:
            candidate.dense.apply(one_model_recipe(m.model, space.dtype))
            got = _score(candidate.dense.model, candidate.tokenizer,
                         {"search": evaluators.search, "report": evaluators.report})
        except Exception as err:
            got = {"error": f"{type(err).__name__}: {err}"[:2000]}
        inputs[m.name] = {"model": m.model, **got}
        study.set_user_attr("inputs", inputs)


def write_moe_best(study: optuna.Study, best_dir: Path, placeholders: Mapping[str, str] | None = None) -> Path:
    """best/NN_trialNNNN.moe.yml (+ .shared.yml) and .json for the top-k trials, written as one
    directory (a half-written best/ never exists)."""
    portable = portable_filter(placeholders or {})
    variables = var_options(placeholders)
    with atomic_dir(best_dir) as build:
        for stem, t, prov in best_entries(study):
            recipe = recipe_of(t)
            steps = [f"evomerge moe best/{stem}.moe.yml OUT --seed {recipe.seed}{variables}"]
            if recipe.shared is not None:
                (build / f"{stem}.shared.yml").write_text(portable(recipe.shared.to_yaml()))
                steps = [f"evomerge merge best/{stem}.shared.yml SHARED_DIR{variables}",
                         steps[0] + f" --var {SHARED_VAR}=SHARED_DIR"]
            header = [f"# evomerge MoE search result: study {study.study_name}, trial {t.number} (rank {prov['rank']})",
                      f"# objectives: {json.dumps(prov['values'])}",
                      f"# held-out report split: {json.dumps(prov['report_scores'])}",
                      *[f"# reproduce: {s}" for s in steps]]
            (build / f"{stem}.moe.yml").write_text(portable("\n".join(header) + "\n" + recipe.moe_yaml()))
            (build / f"{stem}.json").write_text(portable(json.dumps(prov, indent=2, default=str)))
    return best_dir

