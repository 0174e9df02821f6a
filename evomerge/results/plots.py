"""PNG plots of a study: optimization history, Pareto front, parameter importances."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.errors import temp_file_beside
from evomerge.results.store import objectives

PLOT_IMPORTANCE_MIN_TRIALS = 8


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
        tmp = temp_file_beside(path)
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        files[f"plot_{name}"] = path
    return files
