"""The study as the store of a search's results: what each trial merged and scored.

Each trial's user attrs hold its recipe (stored once, as YAML, when it ran), per-task scores and
seeds; the study's user attrs hold the space, held-out scores and checkpoint fingerprints. This
module reads them (the one "trial -> recipe" is :func:`trial_recipe_of`) and states provenance;
:mod:`evomerge.results.files` writes the result files from them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from merge_engine.recipe import MergeRecipe
from merge_engine.stages import Stage, parse_stages


def trial_recipe_of(trial: FrozenTrial) -> MergeRecipe:
    """The recipe a trial merged (of a multi-stage candidate: its final stage; see trial_stages_of)."""
    return trial_stages_of(trial)[-1].recipe


def trial_stages_of(trial: FrozenTrial) -> list[Stage]:
    """The stages a trial merged, in run order (one for a plain recipe)."""
    docs = list(yaml.safe_load_all(trial.user_attrs["recipe"]))
    return parse_stages(docs, source=f"trial {trial.number}")


# ---------------------------------------------------------------- selecting trials
def objectives(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get("objectives") or ["score"] * len(study.directions))[:len(study.directions)]


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The best ``k`` completed trials. One objective: by value. Several: only trials of the
    Pareto front (no other trial is at least as good on every objective), ranked by the
    weighted sum of their objectives (:func:`objective_weights`), each objective first scaled to
    [0, 1] over the front (so a cost in millions, such as ``params``, weighs as much as an
    accuracy, not a million times more); never a mix of trials."""
    if len(study.directions) == 1:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
        return sorted(trials, key=lambda t: (sign * t.value, t.number))[:k]
    weights, front = objective_weights(study), study.best_trials
    if not front:
        return []
    low = [min(vs) for vs in zip(*(t.values for t in front))]
    span = [max(vs) - lo or 1.0 for vs, lo in zip(zip(*(t.values for t in front)), low)]

    def weighted(t: FrozenTrial) -> float:
        return sum(w * (v - lo) / sp for w, v, lo, sp in zip(weights, t.values, low, span))

    return sorted(front, key=lambda t: (-weighted(t), t.number))[:k]


def objective_weights(study: optuna.Study) -> list[float]:
    """The weight of each objective when several are ranked, signed by its direction: the
    space's ``objective_weights`` (``objectives: [{name: ..., weight: ...}]``) where set, else its
    task's weight in the space's eval config, else 1."""
    space = study.user_attrs.get("space") or {}
    tasks = {t.get("name"): t.get("weight", 1.0) for t in (space.get("eval") or {}).get("tasks") or []
             if isinstance(t, dict)}
    chosen = space.get("objective_weights") or {}
    out = []
    for name, d in zip(objectives(study), study.directions):
        sign = 1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0
        w = chosen.get(name, tasks.get(name, 1.0))
        out.append(sign * abs(float(w)) + 0.0)  # + 0.0: a zero weight reads 0, not -0
    return out


def ranking_note(study: optuna.Study) -> str:
    """One line saying how the best trials are chosen (report.txt, best/ headers)."""
    names = objectives(study)
    if len(names) == 1:
        return f"ranked by {names[0]}"
    weights = objective_weights(study)
    terms = " + ".join(f"{w:g}*{n}" for w, n in zip(weights, names))
    chosen = (study.user_attrs.get("space") or {}).get("objective_weights")
    source = ("weights: the space's objective weights" + (", others the eval tasks' weights or 1"
              if len(chosen) < len(names) else "")) if chosen else (
        "weights: the eval tasks' weights or 1; set your own with objectives: [{name: N, weight: W}]")
    return (f"{len(names)} objectives: only Pareto-optimal trials (no trial is at least as good on "
            f"every objective), ranked by {terms}, each objective scaled to [0, 1] over the "
            f"Pareto front ({source})")


def sample_stats(study: optuna.Study) -> dict[str, int]:
    """Evaluated samples, and what the finished trials would have cost without cheap-first pruning."""
    trials = study.get_trials(deepcopy=False)
    spent = sum(t.user_attrs.get("samples", 0) for t in trials)  # docs scored, every rung
    full = sorted(t.user_attrs["search_samples"] for t in trials if "search_samples" in t.user_attrs)
    per_trial = full[len(full) // 2] if full else 0
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return {"samples": spent, "samples_without_pruning": per_trial * finished}


def task_scores(result: dict[str, Any] | None) -> dict[str, float] | None:
    """Per-task values of a stored EvalResult dict (None when missing or it failed)."""
    if not result or "tasks" not in result:
        return None
    return {t["task"]: t["value"] for t in result["tasks"]}



# ---------------------------------------------------------------- provenance
def checkpoint_fingerprint(folder: Path) -> str:
    """sha256 over a checkpoint's shard index and the full content of every safetensors file.

    Headers alone are not enough: fine-tunes of one base share names, shapes and offsets. Files
    are streamed in 16 MiB blocks (a 1B bf16 model hashes in a few seconds); a search computes
    this once, when its study is created.
    """
    h = hashlib.sha256()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        h.update(index.read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        h.update(shard.name.encode())
        with shard.open("rb") as f:
            while block := f.read(16 * 2**20):
                h.update(block)
    return h.hexdigest()


def checkpoint_fingerprints(space: Any) -> dict[str, str | None]:
    """Fingerprint of every input model of ``space`` by its reference (None if unreadable)."""
    from merge_engine.errors import MergeError
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    out: dict[str, str | None] = {}
    for m in ([space.base_model] if space.base_model else []) + list(space.models):
        try:
            out[m.model] = checkpoint_fingerprint(resolve_model_dir(ModelRef.parse(m.model)))
        except (MergeError, OSError):
            out[m.model] = None
    return out


def evomerge_version() -> str:
    try:
        from evomerge import __version__
        return __version__
    except ImportError:  # an editable install seen as a namespace package
        from importlib.metadata import version
        return version("evomerge")


def provenance(study: optuna.Study, t: FrozenTrial, rank: int) -> dict[str, Any]:
    """Everything needed to trust and re-run one result."""
    import torch
    import transformers

    space = study.user_attrs.get("space", {})
    return {
        "study": study.study_name,
        "trial": t.number,
        "rank": rank,
        "values": dict(zip(objectives(study), t.values)),
        "search_scores": t.user_attrs.get("search_scores"),
        "report_scores": task_scores(study.user_attrs.get("report", {}).get(str(t.number))),
        "seed": t.user_attrs.get("seed"),
        "params": t.params,
        "eval": space.get("eval"),
        "report_eval": space.get("report_eval"),
        "checkpoints_sha256": study.user_attrs.get("checkpoints"),
        "versions": {"evomerge_study": study.user_attrs.get("evomerge_version"),
                     "evomerge_export": evomerge_version(), "optuna": optuna.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


