"""The result files of a search, rebuilt from the study alone (so any storage can be exported).

Layout of ``out_dir``::

    trials.csv                  one row per trial: state, values, per-task scores, params, error
    best/01_trial0007.yaml      top-k recipes (mergekit YAML; model paths as run, or ${NAME} for
                                the run's placeholders), comment header
    best/01_trial0007.json      provenance: scores on the search and held-out splits, seeds,
                                versions, sha256 of the input checkpoints
    plots/*.png                 optimization history, per-layer heat map, Pareto fronts, importances
    report.txt                  held-out scores of the top-k next to every input model's
    summary.json, space.yaml    the run at a glance; the space the study was created with

Every file is written to a temporary name and renamed into place (best/ as a whole directory).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial

from evomerge.errors import StorageError, atomic_dir, atomic_write
from evomerge.results.plots import write_plots
from evomerge.results.report import report_table, summary, trials_frame
from evomerge.results.store import provenance, ranking_note, top_trials, trial_stages_of
from merge_engine.stages import stages_yaml


def write_results(study: optuna.Study, out_dir: str | Path,
                  placeholders: Mapping[str, str] | None = None, *,
                  best: Callable[..., Path] | None = None, plots: bool = True) -> dict[str, Path]:
    """Write trials.csv, best/, plots/, report.txt, summary.json and space.yaml for ``study``.
    ``best(study, best_dir, placeholders)`` writes best/ (default :func:`write_best`; an MoE
    search writes mergekit-moe configs there); ``plots=False`` leaves plots/ out.

    ``placeholders`` (``{"ZOO": "/home/me/.cache/evomerge/zoo/demo"}``) turn those local paths
    back into ``${ZOO}`` in the recipes, provenance and space written, so the files can be
    committed and re-run elsewhere with ``--var ZOO=...``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    portable = portable_filter(placeholders or {})
    files = {"trials": atomic_write(out_dir / "trials.csv", trials_frame(study).to_csv(index=False)),
             "best": (best or write_best)(study, out_dir / "best", placeholders)}
    if "space" in study.user_attrs:
        files["space"] = atomic_write(out_dir / "space.yaml", portable(yaml.safe_dump(
            study.user_attrs["space"], sort_keys=False)))
    if plots:
        files.update(write_plots(study, out_dir / "plots").files)
    k = int(study.user_attrs.get("space", {}).get("top_k", 3))
    files["report"] = atomic_write(out_dir / "report.txt", report_table(study, k) + "\n")
    files["summary"] = atomic_write(out_dir / "summary.json", json.dumps(summary(study), indent=2))
    return files


def write_best(study: optuna.Study, best_dir: Path, placeholders: Mapping[str, str] | None = None) -> Path:
    """best/NN_trialNNNN.yaml (recipe with a provenance header) + .json for the top-k trials
    (``placeholders`` as in :func:`write_results`)."""
    portable = portable_filter(placeholders or {})
    lora_dtype = study.user_attrs.get("space", {}).get("lora_merge_dtype")
    options = var_options(placeholders) + (f" --lora-merge-dtype {lora_dtype}" if lora_dtype else "")
    with atomic_dir(best_dir) as build:
        for stem, t, prov in best_entries(study):
            recipe_text = stages_yaml(trial_stages_of(t))  # every stage of a multi-stage candidate
            header = [f"# evomerge search result: study {study.study_name}, trial {t.number} (rank {prov['rank']})",
                      f"# objectives: {json.dumps(prov['values'])} ({ranking_note(study)})",
                      f"# search split: {json.dumps(prov['search_scores'])}",
                      f"# held-out report split: {json.dumps(prov['report_scores'])}",
                      f"# provenance (seeds, versions, checkpoint sha256): {stem}.json"]
            reproduce = f"# reproduce: evomerge merge best/{stem}.yaml OUT_DIR{options}\n"
            (build / f"{stem}.yaml").write_text(portable("\n".join(header) + "\n") + reproduce
                                                + portable(recipe_text))
            (build / f"{stem}.json").write_text(portable(json.dumps(prov, indent=2, default=str)))
    return best_dir


def best_entries(study: optuna.Study) -> Iterator[tuple[str, FrozenTrial, dict[str, Any]]]:
    """``(stem, trial, provenance)`` of the study's top-k trials (``top_k`` of its space), best
    first; ``stem`` (``01_trial0007``) names the trial's files in best/."""
    k = int(study.user_attrs.get("space", {}).get("top_k", 3))
    for rank, t in enumerate(top_trials(study, k), 1):
        yield f"{rank:02d}_trial{t.number:04d}", t, provenance(study, t, rank)


def var_options(placeholders: Mapping[str, str] | None) -> str:
    """The ``--var NAME=FOLDER`` options that give a reproduce command the run's placeholders."""
    return "".join(f" --var {name}={_home_relative(value)}" for name, value in (placeholders or {}).items())


def _home_relative(path: str) -> str:
    """``path`` with the user's home folder written as ``$HOME`` (a shell expands it)."""
    home = str(Path.home())
    return "$HOME" + path[len(home):] if path == home or path.startswith(home + "/") else path


def portable_filter(placeholders: Mapping[str, str]) -> Callable[[str], str]:
    """A text filter writing each placeholder's folder as ``${NAME}`` where it appears as a whole
    path (followed by ``/``, a quote, a space, a comma or the end), longest folders first."""
    pairs = sorted(((str(Path(v)), f"${{{k}}}") for k, v in placeholders.items()), key=lambda pair: -len(pair[0]))
    patterns = [(re.compile(re.escape(path) + r"(?=[/\"'\s,}\]]|$)", re.MULTILINE), name) for path, name in pairs]

    def portable(text: str) -> str:
        for pattern, name in patterns:
            text = pattern.sub(lambda _: name, text)
        return text
    return portable


def export_study(storage: str, study_name: str, out_dir: str | Path) -> dict[str, Path]:
    """Rebuild a run's result files from any Optuna storage URL. A missing study, a SQLite file
    that does not exist or a storage that cannot be reached is one line; nothing is created
    (no empty database beside the user's files, no output folder)."""
    from evomerge.search.preflight import sqlite_path
    from evomerge.search.study import load_stored_study, open_storage, redact

    path = sqlite_path(storage)
    if path is not None and not path.is_file():
        raise StorageError(f"storage {redact(storage)}: no database file {path}; check the path "
                           "(a search writes OUT/study.db)")
    study = load_stored_study(open_storage(storage), study_name)
    if "moe" in study.user_attrs.get("space", {}):  # an MoE search's results (best/*.moe.yml)
        from evomerge.moe.run import write_moe_best

        return write_results(study, out_dir, study.user_attrs.get("placeholders"), best=write_moe_best,
                             plots=False)
    return write_results(study, out_dir, study.user_attrs.get("placeholders"))
