"""Results of a search, rebuilt from the study alone: table, best recipes with provenance, plots.

``write_results(study, out_dir)`` reads only the study (its trials' user attrs hold each recipe,
per-task scores and seeds; the study's user attrs hold the space, held-out scores and checkpoint
fingerprints), so :func:`export_study` rebuilds the same files from any Optuna storage.

Layout of ``out_dir``::

    trials.csv                  one row per trial: state, values, per-task scores, params, error
    best/01_trial0007.yaml      top-k recipes (mergekit YAML, original model paths), comment header
    best/01_trial0007.json      provenance: scores on the search and held-out splits, seeds,
                                versions, sha256 of the input checkpoints' headers
    plots/*.png                 optimization history, Pareto front, parameter importances
    report.txt                  held-out scores of the top-k next to every input model's
    summary.json, space.yaml    the run at a glance; the space the study was created with

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import EvomergeError

PLOT_IMPORTANCE_MIN_TRIALS = 8


# ---------------------------------------------------------------- provenance helpers
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


def redact(storage: str) -> str:
    """A storage URL without its password (one rule, in evomerge.storage)."""
    from evomerge.storage import redact as _redact

    return _redact(storage)


# ---------------------------------------------------------------- selecting trials
def objectives(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get("objectives") or ["score"] * len(study.directions))[:len(study.directions)]


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The best ``k`` completed trials (one objective), or up to ``k`` Pareto-optimal ones
    ordered by the first objective (several)."""
    if len(study.directions) == 1:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
        return sorted(trials, key=lambda t: (sign * t.value, t.number))[:k]
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(study.best_trials, key=lambda t: (sign * t.values[0], t.number))[:k]


def best_values(study: optuna.Study) -> list[float] | None:
    """Best value per objective so far (for progress lines), or None before the first result."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return None
    out = []
    for i, d in enumerate(study.directions):
        pick = max if d == optuna.study.StudyDirection.MAXIMIZE else min
        out.append(pick(t.values[i] for t in trials))
    return out


def sample_stats(study: optuna.Study) -> dict[str, int]:
    """Evaluated samples, and what the finished trials would have cost without cheap-first pruning."""
    trials = study.get_trials(deepcopy=False)
    spent = sum(t.user_attrs.get("cheap_samples", 0) + t.user_attrs.get("search_samples", 0) for t in trials)
    full = sorted(t.user_attrs["search_samples"] for t in trials if "search_samples" in t.user_attrs)
    per_trial = full[len(full) // 2] if full else 0
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return {"samples": spent, "samples_without_pruning": per_trial * finished}


# ---------------------------------------------------------------- tables
def trials_frame(study: optuna.Study):
    """One row per trial: number, state, value(s), per-task scores, params, provenance, error."""
    import pandas as pd

    names = objectives(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        # A pruned trial's value is its cheap-first score (Optuna's convention); it is kept in
        # its own column so "value" always means the full evaluation.
        values = t.values if t.state == TrialState.COMPLETE else [None] * len(names)
        if len(names) == 1:
            row["value"] = values[0]
        else:
            row.update({f"value_{n}": v for n, v in zip(names, values)})
        row["cheap_score"] = t.intermediate_values.get(0)
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        for stage in ("search", "cheap"):
            row.update({f"{stage}_{k}": v for k, v in (t.user_attrs.get(f"{stage}_scores") or {}).items()})
        row["samples"] = t.user_attrs.get("cheap_samples", 0) + t.user_attrs.get("search_samples", 0)
        for key in ("start_point", "retry_of", "error"):
            row[key] = t.user_attrs.get(key)
        row.update({f"param_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _task_scores(result: dict[str, Any] | None) -> dict[str, float] | None:
    """Per-task values of a stored EvalResult dict (None when missing or it failed)."""
    if not result or "tasks" not in result:
        return None
    return {t["task"]: t["value"] for t in result["tasks"]}


def report_table(study: optuna.Study, k: int = 1) -> str:
    """Per-task held-out (report split) scores of the top trials next to every input model's,
    with each one's mean on the report and the search split. Without held-out results the
    per-task columns show the search split."""
    report = study.user_attrs.get("report", {})
    inputs = study.user_attrs.get("inputs", {})
    rows: list[tuple[str, dict[str, float] | None, dict[str, float] | None]] = []
    for name, data in inputs.items():
        rows.append((f"input {name}", _task_scores(data.get("search")), _task_scores(data.get("report"))))
    for t in top_trials(study, k):
        rows.append((f"merge (trial {t.number})", t.user_attrs.get("search_scores"),
                     _task_scores(report.get(str(t.number)))))
    if not rows:
        return "no results yet"
    held_out = any(rep for _, _, rep in rows)
    per_task = [rep if held_out else search for _, search, rep in rows]
    tasks = list(dict.fromkeys(task for scores in per_task for task in scores or {}))

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def mean(scores: dict[str, float] | None) -> float | None:
        return sum(scores.values()) / len(scores) if scores else None

    header = ["model", *tasks, "report mean", "search mean"]
    body = [[label, *(fmt((scores or {}).get(task)) for task in tasks), fmt(mean(rep)), fmt(mean(search))]
            for (label, search, rep), scores in zip(rows, per_task)]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    split = "held-out report split" if held_out else "search split (no report split evaluated)"
    return "\n".join([f"per-task columns: {split}", line(header), "  ".join("-" * w for w in widths),
                      *map(line, body)])


# ---------------------------------------------------------------- atomic files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_file(folder: Path, name: str) -> Path:
    """A new temporary file beside ``folder/name``, with normal file permissions."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def _atomic_write(path: Path, data: str | bytes) -> Path:
    tmp = _temp_file(path.parent, path.name)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def _replace_dir(build: Path, target: Path) -> None:
    """Swap a fully written directory into place (the old one is removed after the rename)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(build, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- writing
def write_results(study: optuna.Study, out_dir: str | Path) -> dict[str, Path]:
    """Write trials.csv, best/, plots/, summary.json and space.yaml for ``study``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"trials": _atomic_write(out_dir / "trials.csv", trials_frame(study).to_csv(index=False)),
             "best": write_best(study, out_dir / "best")}
    if "space" in study.user_attrs:
        files["space"] = _atomic_write(out_dir / "space.yaml", yaml.safe_dump(
            study.user_attrs["space"], sort_keys=False))
    files.update(write_plots(study, out_dir / "plots"))
    k = int(study.user_attrs.get("space", {}).get("top_k", 3))
    files["report"] = _atomic_write(out_dir / "report.txt", report_table(study, k) + "\n")
    files["summary"] = _atomic_write(out_dir / "summary.json", json.dumps(summary(study), indent=2))
    return files


def summary(study: optuna.Study) -> dict[str, Any]:
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    top = top_trials(study, 1)
    return {
        "study": study.study_name,
        "objectives": objectives(study),
        "trials": {s: states.count(s) for s in sorted(set(states))},
        "best_trial": top[0].number if top else None,
        "best_values": top[0].values if top else None,
        "best_report": _task_scores(study.user_attrs.get("report", {}).get(str(top[0].number)))
        if top else None,
        "inputs": {name: {"search": _task_scores(d.get("search")), "report": _task_scores(d.get("report"))}
                   for name, d in study.user_attrs.get("inputs", {}).items()},
        **sample_stats(study),
    }


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
        "report_scores": _task_scores(study.user_attrs.get("report", {}).get(str(t.number))),
        "seed": t.user_attrs.get("seed"),
        "params": t.params,
        "eval": space.get("eval"),
        "report_eval": space.get("report_eval"),
        "checkpoints_sha256": study.user_attrs.get("checkpoints"),
        "versions": {"evomerge_study": study.user_attrs.get("evomerge_version"),
                     "evomerge_export": evomerge_version(), "optuna": optuna.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def write_best(study: optuna.Study, best_dir: Path) -> Path:
    """best/NN_trialNNNN.yaml (recipe with a provenance header) + .json for the top-k trials."""
    from merge_engine.recipe import parse_recipe

    k = int(study.user_attrs.get("space", {}).get("top_k", 3))
    best_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=best_dir.parent, prefix=f".{best_dir.name}.tmp-"))
    os.chmod(build, 0o777 & ~_umask())
    for rank, t in enumerate(top_trials(study, k), 1):
        stem = f"{rank:02d}_trial{t.number:04d}"
        recipe = parse_recipe(yaml.safe_load(t.user_attrs["recipe"]))
        prov = provenance(study, t, rank)
        header = [f"# evomerge search result: study {study.study_name}, trial {t.number} (rank {rank})",
                  f"# objectives: {json.dumps(prov['values'])}",
                  f"# search split: {json.dumps(prov['search_scores'])}",
                  f"# held-out report split: {json.dumps(prov['report_scores'])}",
                  f"# provenance (seeds, versions, checkpoint sha256): {stem}.json",
                  f"# reproduce: evomerge merge best/{stem}.yaml OUT_DIR"]
        (build / f"{stem}.yaml").write_text("\n".join(header) + "\n" + recipe.to_yaml())
        (build / f"{stem}.json").write_text(json.dumps(prov, indent=2, default=str))
    _replace_dir(build, best_dir)
    return best_dir


def write_plots(study: optuna.Study, plot_dir: Path) -> dict[str, Path]:
    """PNG plots; a plot that cannot be drawn (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return {}
    names = objectives(study)
    multi = len(names) > 1
    target = (lambda t: t.values[0]) if multi else None
    plots = {"optimization_history": lambda: ovm.plot_optimization_history(
        study, target=target, target_name=names[0])}
    if multi:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=names)
    if len(complete) >= PLOT_IMPORTANCE_MIN_TRIALS and len(complete[0].params) > 1:
        plots["param_importances"] = lambda: ovm.plot_param_importances(
            study, target=target, target_name=names[0])
    files = {}
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances of parameters that never varied
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = plot_dir / f"{name}.png"
        tmp = _temp_file(plot_dir, path.name)
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        files[f"plot_{name}"] = path
    return files


def export_study(storage: str, study_name: str, out_dir: str | Path) -> dict[str, Path]:
    """Rebuild a run's result files from any Optuna storage URL."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise EvomergeError(f"no study {study_name!r} in {redact(storage)}; studies there: {names}") from None
    return write_results(study, out_dir)
