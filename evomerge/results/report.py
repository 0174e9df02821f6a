"""Tables of a search's results: one row per trial, held-out scores next to the inputs', summary."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.results.store import objectives, ranking_note, sample_stats, task_scores, top_trials
from evomerge.space import SCORE


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
        row["samples"] = t.user_attrs.get("samples", 0)
        for key in ("start_point", "retry_of", "error"):
            row[key] = t.user_attrs.get(key)
        row.update({f"param_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def report_table(study: optuna.Study, k: int = 1) -> str:
    """Per-task held-out (report split) scores of the top trials next to every input model's,
    with each one's mean on the report and the search split. Without held-out results the
    per-task columns show the search split."""
    report = study.user_attrs.get("report", {})
    inputs = study.user_attrs.get("inputs", {})
    rows: list[tuple[str, dict[str, float] | None, dict[str, float] | None]] = []
    for name, data in inputs.items():
        rows.append((f"input {name}", task_scores(data.get("search")), task_scores(data.get("report"))))
    top = top_trials(study, k)
    for t in top:
        rows.append((f"merge (trial {t.number})", t.user_attrs.get("search_scores"),
                     task_scores(report.get(str(t.number)))))
    if not rows:
        return "no results yet"
    held_out = any(rep for _, _, rep in rows)
    per_task = [rep if held_out else search for _, search, rep in rows]
    tasks = list(dict.fromkeys(task for scores in per_task for task in scores or {}))

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def mean(scores: dict[str, float] | None) -> float | None:
        return sum(scores.values()) / len(scores) if scores else None

    # objectives measured on the candidate itself (costs, Python callables): the trial's value
    names = objectives(study)
    space_tasks = {t.get("name") for t in (study.user_attrs.get("space") or {}).get("eval", {}).get("tasks", [])
                   if isinstance(t, dict)}
    own = [(i, n) for i, n in enumerate(names) if n != SCORE and n not in {*tasks, *space_tasks}]
    values = [None] * (len(rows) - len(top)) + [t.values for t in top]

    def fmt_own(row_values: list[float] | None, i: int) -> str:
        v = None if row_values is None else row_values[i]
        return "-" if v is None else f"{v:.0f}" if abs(v) >= 1000 or float(v).is_integer() else f"{v:.4g}"

    header = ["model", *tasks, "report mean", "search mean", *(n for _, n in own)]
    body = [[label, *(fmt((scores or {}).get(task)) for task in tasks), fmt(mean(rep)), fmt(mean(search)),
             *(fmt_own(vals, i) for i, _ in own)]
            for (label, search, rep), scores, vals in zip(rows, per_task, values)]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    split = "held-out report split" if held_out else "search split (no report split evaluated)"
    return "\n".join([f"best trials: {ranking_note(study)}", f"per-task columns: {split}", line(header),
                      "  ".join("-" * w for w in widths),
                      *map(line, body)])


def summary(study: optuna.Study) -> dict[str, Any]:
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    top = top_trials(study, 1)
    return {
        "study": study.study_name,
        "objectives": objectives(study),
        "ranking": ranking_note(study),
        "trials": {s: states.count(s) for s in sorted(set(states))},
        "best_trial": top[0].number if top else None,
        "best_values": top[0].values if top else None,
        "best_report": task_scores(study.user_attrs.get("report", {}).get(str(top[0].number)))
        if top else None,
        "inputs": {name: {"search": task_scores(d.get("search")), "report": task_scores(d.get("report"))}
                   for name, d in study.user_attrs.get("inputs", {}).items()},
        **sample_stats(study),
    }
