"""Checks that run before a search writes anything, and what a run learns from the storage.

    points = check_models(space)                 # every method's models merge; start recipes read
    known = stored_trial_count(url, name)        # None: no such study (creates no file)
    claim_out_dir(out_dir, url, name)            # refuses a folder holding another study's results
    seed = sampler_seed(space.seed, known, worker=...)

A misspelled task, a model that cannot be merged or loaded safely, or an unreadable start recipe
is reported before a study, a database file or an output folder exists, so the corrected command
starts cleanly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from evomerge.errors import StorageError
from evomerge.space import SearchSpace, SpaceError, equal_params, start_points


def check_models(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """Check that every method of ``space`` can merge its models (architectures, shapes, files
    that load safely: no pickle, no remote code) and read the start points; returns the start
    points. Raises :class:`SpaceError` listing every problem."""
    from merge_engine import session
    from evomerge.space import build_recipe
    from evomerge.space.stages import validate_candidate

    problems: list[str] = []
    for method in space.methods:
        params = {k: v for k, v in equal_params(space, method).items() if k != "method"}
        try:
            report = validate_candidate(space, build_recipe(space, method, params))
        except Exception as err:  # noqa: BLE001  a recipe the space cannot build is a space problem
            problems.append(f"method {method}: {err}")
            continue
        problems += [p for p in report.problems if p not in problems]
    if problems:
        raise SpaceError(problems, f"search space {space.name}")
    try:
        return start_points(space)
    except SpaceError:
        raise
    except Exception as err:  # noqa: BLE001  a start recipe is the user's file
        raise SpaceError(f"start point: {err}", f"search space {space.name}") from None


def stored_trial_count(url: str, study_name: str, *, storage: Any = None) -> int | None:
    """How many trials study ``study_name`` holds, or None when it does not exist. A SQLite URL
    whose file is missing is a missing study: the file is not created. ``storage``: the storage
    at ``url`` when the caller has it open already."""
    from evomerge.search.study import open_storage

    if storage is None and (path := sqlite_path(url)) is not None and not path.exists():
        return None
    storage = storage or open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    except Exception as err:  # noqa: BLE001  the database answered with an error: it is damaged
        raise StorageError(damaged(url, err)) from None
    return storage.get_n_trials(study_id)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url.removeprefix("sqlite:///").split("?", 1)[0])


def damaged(url: str, err: BaseException) -> str:
    from evomerge.search.study import redact

    first = str(getattr(err, "orig", None) or err).splitlines()[0] if str(err) else type(err).__name__
    return (f"storage {redact(url)} cannot be read ({first}); it is damaged: restore it from a "
            "copy, or move it away and start the search again")


def claim_out_dir(out_dir: Path, url: str, study_name: str, *, storage: Any = None) -> None:
    """Refuse an output folder that holds another study's results (its summary.json or its
    study.db names another study): results of two studies never mix in one folder.
    ``storage``: the storage at ``url`` when the caller has it open already."""
    other: str | None = None
    summary = out_dir / "summary.json"
    if summary.is_file():
        try:
            other = json.loads(summary.read_text()).get("study")
        except (ValueError, OSError, AttributeError):
            other = None
    db = out_dir / "study.db"
    if other in (None, study_name) and db.is_file() and sqlite_path(url) == db.resolve():
        import optuna

        from evomerge.search.study import open_storage

        try:
            names = optuna.get_all_study_names(storage or open_storage(url))
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001
            raise StorageError(damaged(url, err)) from None
        if names and study_name not in names:
            other = names[0]
    if other not in (None, study_name):
        raise StorageError(f"{out_dir} holds the results of study {other!r}; pass another --out "
                           f"folder for study {study_name!r} (or --study {other} to resume that one)")


def sampler_seed(space_seed: int, trials_at_start: int | None, *, worker: int | None = None) -> int:
    """The sampler's seed for one process: the space's seed for a run that starts a study (one
    uninterrupted run is reproducible); worker ``k`` (its slot in the study,
    :func:`~evomerge.search.workers.claim_worker_slot`, from 1) gets ``space_seed + k * 0x9E3779B1``
    mod 2**32: reproducible, and distinct for every k by construction (the multiplier is odd, so
    k -> seed is one-to-one); a resumed run (trials already stored) gets a seed of its own, so it
    does not propose again what the study already holds."""
    if worker is not None:
        return (space_seed + worker * 0x9E3779B1) % 2**32
    if not trials_at_start:
        return space_seed
    key = f"{space_seed}:{trials_at_start}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
