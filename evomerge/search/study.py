"""Where a study lives and what it holds: the storage, the stored space, the start points.

    storage = open_storage(url, default_sqlite=out_dir / "study.db")   # once per run
    study = open_study(space, storage=storage, study_name=name)        # creates or resumes
    enqueue_start_points(study, space, points)                         # once, when new

Everything a worker needs to join a study lives in the study itself: the search space (with its
eval settings) is stored in the study's user attrs (:func:`space_from_study`). Storages record
heartbeats; how trials of dead workers are found and retried is :mod:`evomerge.search.workers`.
Heartbeat settings come from :class:`Heartbeat` (defaults suit trials of seconds to hours: the
heartbeat runs in its own thread, so the trial's length does not matter) or from the environment
of a worker: ``EVOMERGE_HEARTBEAT_INTERVAL``, ``EVOMERGE_GRACE_PERIOD`` (seconds) and
``EVOMERGE_MAX_RETRY``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, RDBStorage

from evomerge.adapters.optuna import storage_url
from evomerge.errors import EvomergeError, StorageError
from evomerge.results.store import checkpoint_fingerprints, evomerge_version
from evomerge.search.samplers import default_sampler, make_pruner, make_sampler
from evomerge.space import SearchSpace, start_points

CONNECT_TIMEOUT = 5      # seconds to reach a database server before giving up
SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite write waits for another process's lock


@dataclass(frozen=True)
class Heartbeat:
    """How dead workers are found: every ``interval`` s a running trial's worker records a
    heartbeat; a RUNNING trial without one for ``grace_period`` s is failed and its parameters
    retried, at most ``max_retry`` times (a candidate that keeps killing its worker stops there)."""

    interval: int = 10
    grace_period: int = 60
    max_retry: int = 3

    def __post_init__(self) -> None:
        if self.interval < 1 or self.grace_period <= self.interval or self.max_retry < 0:
            raise EvomergeError(
                f"heartbeat interval {self.interval}s, grace period {self.grace_period}s, max retry "
                f"{self.max_retry}: need interval >= 1, grace period > interval and max retry >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Heartbeat:
        """Defaults overridden by EVOMERGE_HEARTBEAT_INTERVAL / _GRACE_PERIOD / _MAX_RETRY."""
        env = os.environ if env is None else env
        names = {"interval": "EVOMERGE_HEARTBEAT_INTERVAL", "grace_period": "EVOMERGE_GRACE_PERIOD",
                 "max_retry": "EVOMERGE_MAX_RETRY"}
        values = {}
        for field, name in names.items():
            if env.get(name):
                try:
                    values[field] = int(env[name])
                except ValueError:
                    raise EvomergeError(f"{name}={env[name]!r}: expected a whole number of "
                                        "seconds (or retries)") from None
        if "interval" in values and "grace_period" not in values:
            values["grace_period"] = max(cls.grace_period, 6 * values["interval"])
        return cls(**values)


def open_storage(url: str | None, default_sqlite: Path | None = None, *,
                 heartbeat: Heartbeat | None = None) -> RDBStorage:
    """The storage at ``url`` (default: SQLite at ``default_sqlite``), with heartbeats on.

    Connects at once: an unreachable server, a missing database or driver, or a malformed URL
    raise :class:`EvomergeError` (a :class:`StorageError` when the database cannot be reached or
    read; one line naming the URL without its password, and the fix)
    within :data:`CONNECT_TIMEOUT` seconds.
    """
    import sqlalchemy.exc

    if url is None:
        if default_sqlite is None:
            raise EvomergeError("no storage URL given; pass --storage URL")
        url = f"sqlite:///{Path(default_sqlite).resolve()}"
    authority = url.partition("://")[2].partition("/")[0]
    if authority.count("@") > 1:
        raise EvomergeError(f"storage {redact(url)}: the password contains '@'; percent-encode "
                            "it in the URL ('@' is %40, ':' is %3A, '/' is %2F)")
    beat = heartbeat or Heartbeat.from_env()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat args are "experimental"
        try:
            return RDBStorage(url, engine_kwargs=_engine_kwargs(url),
                              heartbeat_interval=beat.interval, grace_period=beat.grace_period)
        except ImportError as err:
            raise EvomergeError(f"storage {redact(url)}: its database driver is not installed "
                                f"({_first_line(err.__cause__ or err)}); install it (PostgreSQL: "
                                "pip install 'evomerge[postgres]')") from None
        except sqlalchemy.exc.ArgumentError as err:
            raise EvomergeError(f"storage {redact(url)} is not a database URL ({_first_line(err)}); "
                                "use e.g. postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB or "
                                "sqlite:///PATH/study.db") from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            if "not a database" in str(err) or "malformed" in str(err):
                from evomerge.search.preflight import damaged

                raise StorageError(damaged(url, err)) from None
            fix = ("check that its folder exists and is writable" if url.startswith("sqlite")
                   else "check that the server is running and reachable from this machine and "
                        "that the URL's host, port, user, password and database are right")
            raise StorageError(f"cannot open storage {redact(url)}: {_first_line(err)}; {fix}") from None


def open_existing_storage(url: str, *, heartbeat: Heartbeat | None = None) -> RDBStorage | None:
    """The storage at ``url`` opened once for a whole run, or None while it is a SQLite file that
    does not exist yet: opening would create the file, and a search writes nothing before its
    checks pass (it opens the storage with :func:`open_storage` after them)."""
    from evomerge.search.preflight import sqlite_path

    if (path := sqlite_path(url)) is not None and not path.exists():
        return None
    return open_storage(url, heartbeat=heartbeat)


def _engine_kwargs(url: str) -> dict[str, Any]:
    """Fail fast on an unreachable server; survive a server restart between long trials;
    let concurrent SQLite writers wait for each other instead of failing."""
    dialect = url.split(":", 1)[0].split("+", 1)[0].lower()
    if dialect == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    if dialect in ("postgresql", "postgres", "mysql", "mariadb"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    return {}


def _first_line(err: BaseException) -> str:
    """The driver's own message (not SQLAlchemy's wrapping, which repeats the SQL and a link)."""
    orig = getattr(err, "orig", None) or err
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return redact(lines[0]) if lines else type(orig).__name__


def redact(url: str | BaseStorage) -> str:
    """A storage URL (or a storage's URL) fit to print: the password replaced by ``***``."""
    if isinstance(url, BaseStorage):
        url = storage_url(url)
    return re.sub(r"(://[^:/@\s]+):\S*@", r"\1:***@", str(url))  # to the last @: passwords may hold one


# ---------------------------------------------------------------- the study
# Fields of a space that may change between runs of one study (a resume with a larger budget,
# other objective weights to pick the best of the same Pareto front, another machine's memory).
_RESUMABLE_FIELDS = ("budget", "sampler", "top_k", "report_eval", "start", "objective_weights",
                     "task_vector_cache")


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def open_study(space: SearchSpace, *, storage: str | BaseStorage, study_name: str,
               sampler: str | None = None, seed: int | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (its space must match this one). The
    sampler is seeded with ``seed`` (default: the space's; see
    :func:`~evomerge.search.preflight.sampler_seed` for resumed runs and workers)."""
    study = optuna.create_study(
        storage=storage, study_name=study_name, load_if_exists=True,
        directions=space.directions,
        sampler=make_sampler(sampler or default_sampler(space), seed=space.seed if seed is None else seed,
                             n_objectives=len(space.objectives), pruning=(space.pruning or space.fidelity) is not None,
                             budget=space.budget.trials, space=space),
        pruner=make_pruner(space.fidelity or space.pruning))
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", space.model_dump(mode="json"))
        study.set_user_attr("objectives", list(space.objectives))
        study.set_user_attr("evomerge_version", evomerge_version())
        study.set_user_attr("checkpoints", checkpoint_fingerprints(space))
    elif (differ := _differences(stored, space.model_dump(mode="json"))):
        raise EvomergeError(f"study {study_name!r} in {redact(storage)} was created from a "
                            f"different search space ({', '.join(differ)} differ); use the same "
                            "space file or a new --study name")
    elif stored.get("objective_weights", {}) != space.objective_weights:
        # the results this run writes rank the front with the weights it was given
        study.set_user_attr("space", {**stored, "objective_weights": space.objective_weights})
    return study


def _differences(stored: dict[str, Any], dump: dict[str, Any]) -> list[str]:
    """The fields (other than the resumable ones) in which two dumped spaces differ."""
    keys = dict.fromkeys([*stored, *dump])
    return [k for k in keys if k not in _RESUMABLE_FIELDS and stored.get(k) != dump.get(k)]


def space_from_study(study: optuna.Study) -> SearchSpace:
    """The search space a study was created with (a worker needs nothing else to join). Its
    start points are left out: only the study's creator enqueues them, so a worker never needs
    the start-recipe files (which may live on the creator's machine only)."""
    stored = study.user_attrs.get("space")
    if stored is None:
        raise EvomergeError(f"study {study.study_name!r} holds no evomerge search space; "
                            "was it created by `evomerge search`?")
    return SearchSpace.model_validate({**stored, "start": ["equal"]})


def load_stored_study(storage: str | BaseStorage, study_name: str) -> optuna.Study:
    """An existing study by name; a missing one names the studies the storage holds."""
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise EvomergeError(f"no study {study_name!r} in {redact(storage)}; "
                            f"studies there: {optuna.get_all_study_names(storage)}") from None


def enqueue_start_points(study: optuna.Study, space: SearchSpace,
                         points: list[tuple[str, dict[str, Any]]] | None = None) -> int:
    """Enqueue the space's start points once, when the study is new (``points``: the start
    points already read by :func:`~evomerge.search.preflight.check_models`)."""
    if study.get_trials(deepcopy=False):
        return 0
    points = start_points(space) if points is None else points
    for label, params in points:
        study.enqueue_trial(params, user_attrs={"start_point": label})
    return len(points)
