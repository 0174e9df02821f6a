"""PNG plots of a study, drawn with matplotlib (Agg) from :mod:`evomerge.results.plot_data`.

    plots/optimization_history.png   each objective per trial, the running best, pruned trials
                                     at their cheap-first score, and lines for every input model
                                     and the uniform merge: did the search beat them?
    plots/layer_parameters.png       heat map of the best recipe's parameters per layer
    plots/pareto_front.png           several objectives: one panel per pair, front highlighted,
                                     input models marked
    plots/param_importances.png      Optuna's parameter importances (first objective)
    plots/README.txt                 what each plot shows, and why any plot was skipped

A plot that cannot say anything (too few trials, one objective, no per-layer parameters) is not
drawn; :class:`Plots` ``skipped`` and README.txt say which and why.
"""

from __future__ import annotations

import io
import itertools
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.errors import atomic_write
from evomerge.results.plot_data import (input_scores, layer_table, maximized, model_names,
                                        objective_history, objective_label, pareto_front)
from evomerge.results.store import objectives, top_trials, trial_recipe_of

HISTORY_MIN_TRIALS = 2
PARETO_MIN_TRIALS = 2
PLOT_IMPORTANCE_MIN_TRIALS = 8
ANNOTATE_MAX_CELLS = 300  # heat map cells get their value written in them up to this many

_DESCRIPTIONS = {
    "optimization_history": "objective per trial, running best, input models and uniform merge as lines",
    "layer_parameters": "the best recipe's parameter values per layer",
    "pareto_front": "each pair of objectives: all trials, the front of the pair, the input models",
    "param_importances": "how much each searched parameter explains the first objective (Optuna)",
}


@dataclass
class Plots:
    """``files``: result-file key (``plot_<name>``) -> PNG written; ``skipped``: one line per plot
    not drawn, e.g. ``plot pareto_front skipped: one objective``."""

    files: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def write_plots(study: optuna.Study, plot_dir: Path) -> Plots:
    """Draw every plot the study supports into ``plot_dir`` (each file renamed into place)."""
    import matplotlib

    matplotlib.use("Agg")
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    out = Plots()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    n_obj = len(study.directions)
    candidates: list[tuple[str, str | None, Any]] = [
        ("optimization_history",
         _too_few(len(finished), HISTORY_MIN_TRIALS, "finished") or (None if complete else "no completed trial"),
         _history_figure),
        ("layer_parameters", None if complete else "no completed trial", _layer_figure),
        ("pareto_front", "one objective" if n_obj < 2 else _too_few(len(complete), PARETO_MIN_TRIALS, "completed"),
         _pareto_figure),
        ("param_importances", _too_few(len(complete), PLOT_IMPORTANCE_MIN_TRIALS, "completed")
         or (None if len(complete[0].params) > 1 else "fewer than 2 searched parameters"),
         _importance_figure),
    ]
    for name, reason, draw in candidates:
        fig = None
        if reason is None:
            fig, reason = _draw(draw, study)
        if fig is None:
            out.skipped.append(f"plot {name} skipped: {reason}")
            continue
        out.files[f"plot_{name}"] = _save(fig, plot_dir / f"{name}.png")
    notes = [f"{p.name}: {_DESCRIPTIONS[p.stem]}" for p in out.files.values()] + out.skipped
    out.files["plot_notes"] = atomic_write(plot_dir / "README.txt", "\n".join(notes) + "\n")
    return out


def _too_few(n: int, minimum: int, what: str) -> str | None:
    return None if n >= minimum else f"only {n} {what} trial{'s' * (n != 1)} (needs {minimum})"


def _draw(draw: Any, study: optuna.Study) -> tuple[Any, str | None]:
    """(figure, None), or (None, why not) when the study holds nothing this plot can show."""
    import matplotlib.pyplot as plt

    # optuna's plots switch the global style (plt.style.use); a context keeps each figure's own
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        try:
            return draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. params that never varied
            return None, f"{type(err).__name__}: {err}".splitlines()[0]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=110, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def _wrap(text: str, width: int = 48) -> str:
    return "\n".join(textwrap.wrap(text, width))


# ---------------------------------------------------------------- the figures
def _history_figure(study: optuna.Study) -> tuple[Any, str | None]:
    import matplotlib.pyplot as plt

    n = len(study.directions)
    fig, axes = plt.subplots(n, 1, figsize=(10, 4.6 * n), squeeze=False)
    space = study.user_attrs.get("space") or {}
    cheap_docs = (space.get("pruning") or {}).get("limit")
    palette = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for i, ax in enumerate(axes[:, 0]):
        h = objective_history(study, i)
        if h.pruned:
            xs, ys = zip(*h.pruned)
            docs = f", {cheap_docs} docs per task" if cheap_docs else ""
            ax.scatter(xs, ys, marker="x", color="0.55", s=36, label=f"pruned (cheap-first score{docs})")
        xs, ys = zip(*h.complete)
        ax.scatter(xs, ys, color="tab:blue", s=30, label="complete trial", zorder=3)
        bx, by = zip(*h.best)
        ax.step(bx, by, where="post", color="tab:red", lw=2, label="best so far", zorder=2)
        for k, (label, value) in enumerate(h.lines.items()):
            uniform = label.startswith("uniform")
            ax.axhline(value, color="black" if uniform else palette[k % len(palette)],
                       ls="-" if uniform else ("--", ":", "-.")[k % 3], lw=1.3, label=f"{label}: {value:.3f}")
        ax.set_xlabel("trial number")
        ax.set_ylabel(_wrap(h.label, 44))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        if n > 1:
            ax.set_title(objectives(study)[i], fontsize=11)
    fig.suptitle("Optimization history: did the search beat the input models?", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig, None


def _layer_figure(study: optuna.Study) -> tuple[Any, str | None]:
    import matplotlib.pyplot as plt
    import numpy as np

    best = top_trials(study, 1)[0]
    recipe = trial_recipe_of(best)
    if recipe.models is None:
        return None, "the best recipe uses slices; per-layer plots cover 'models' recipes"
    layers = int((study.user_attrs.get("space") or {}).get("num_layers") or 0) or _list_length(recipe)
    table = layer_table(recipe, layers, model_names(study))
    if not table.layered:
        return None, f"the best recipe (trial {best.number}) sets no per-layer or per-filter parameter"
    data = np.array([[np.nan if v is None else v for v in row] for row in table.values], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * layers + 4.5), max(3.0, 0.42 * len(table.rows) + 1.6)))
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(table.rows)), table.rows, fontsize=10)
    step = max(1, layers // 24)
    ax.set_xticks(range(0, layers, step), [str(i) for i in range(0, layers, step)])
    ax.set_xlabel("layer")
    ax.set_title(f"Best recipe (trial {best.number}, {recipe.merge_method}): parameters per layer", fontsize=12)
    if data.size <= ANNOTATE_MAX_CELLS:
        finite = data[np.isfinite(data)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (r, c), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if v > mid else "white")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="value")
    fig.tight_layout()
    return fig, None


def _list_length(recipe: Any) -> int:
    lengths = [len(v) for m in recipe.models or () for v in (m.parameters or {}).values() if isinstance(v, list)]
    return max(lengths, default=1)


def _pareto_figure(study: optuna.Study) -> tuple[Any, str | None]:
    import matplotlib.pyplot as plt

    names = objectives(study)
    up = maximized(study)
    pairs = list(itertools.combinations(range(len(names)), 2))
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 5.0 * rows), squeeze=False)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    inputs = [input_scores(study, i) for i in range(len(names))]
    for ax, (a, b) in zip(axes.flat, pairs):
        points = [(t.values[a], t.values[b]) for t in trials]
        front = pareto_front(points, (up[a], up[b]))
        ax.scatter(*zip(*points), color="0.65", s=24, label="trial")
        on_front = sorted((points[i] for i in front), key=lambda p: p[0])
        ax.plot(*zip(*on_front), color="tab:red", lw=1.2, alpha=0.6)
        ax.scatter(*zip(*on_front), color="tab:red", s=44, zorder=3, label="Pareto front of this pair")
        for t_index in front:
            ax.annotate(f"#{trials[t_index].number}", points[t_index], fontsize=8,
                        xytext=(4, 4), textcoords="offset points", color="tab:red")
        at: dict[tuple[float, float], list[str]] = {}  # models at one point share one label
        for model in inputs[a]:
            if model in inputs[b]:
                at.setdefault((inputs[a][model], inputs[b][model]), []).append(model)
        for xy, models in at.items():
            ax.scatter(*xy, marker="*", s=160, color="tab:blue", edgecolor="black", zorder=4,
                       label="input model")
            ax.annotate(", ".join(models), xy, fontsize=9, xytext=(6, -10), textcoords="offset points")
        ax.set_xlabel(_wrap(objective_label(study, a), 40))
        ax.set_ylabel(_wrap(objective_label(study, b), 40))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=9, loc="best")
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    fig.suptitle("Trade-offs between objectives (search split)", fontsize=13)
    fig.tight_layout()
    return fig, None


def _importance_figure(study: optuna.Study) -> tuple[Any, str | None]:
    from optuna.visualization import matplotlib as ovm

    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    ax = ovm.plot_param_importances(study, target=target, target_name=objectives(study)[0])
    fig = ax.figure
    n_params = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))[0].params)
    fig.set_size_inches(9, max(3.5, 0.35 * n_params + 1.5))
    ax.set_title("", loc="left")  # optuna's generic title
    ax.set_title(f"Parameter importances for {objectives(study)[0]} (Optuna, fANOVA)", fontsize=12)
    fig.tight_layout()
    return fig, None
