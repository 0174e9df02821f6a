"""Where a study lives: an Optuna storage that survives dead workers, and its user-facing errors.

    storage = open_storage(url, default_sqlite=out_dir / "study.db")   # once per process
    study = optuna.create_study(storage=storage, ...)                  # optuna takes the object
    trial = ask(study)                       # fails trials of dead workers first, then asks
    with heartbeat(study, trial):            # "this worker is alive" every interval
        ...evaluate, study.tell(...)

A worker killed mid-trial (SIGKILL, OOM, preemption, a lost machine) stops sending heartbeats.
After the grace period the next worker that asks for a trial marks it FAIL and enqueues its
parameters again as a WAITING trial (user attr ``retry_of``, Optuna's system attrs
``failed_trial``/``retry_history``), which the next ``ask`` picks up. Optuna records heartbeats
only inside ``Study.optimize``; our loop is ask/tell, hence :func:`ask` and :func:`heartbeat`.

Heartbeat settings come from :class:`Heartbeat` (defaults suit trials of seconds to hours:
the heartbeat runs in its own thread, so the trial's length does not matter) or from the
environment of a worker: ``EVOMERGE_HEARTBEAT_INTERVAL``, ``EVOMERGE_GRACE_PERIOD`` (seconds)
and ``EVOMERGE_MAX_RETRY``.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial

from evomerge.errors import EvomergeError

CONNECT_TIMEOUT = 5      # seconds to reach a database server before giving up
SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite write waits for another process's lock
# User attrs a retried trial keeps from the trial it retries (the rest belong to that attempt).
_CARRIED_ATTRS = ("start_point",)


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


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial, with our ``retry_of`` user attr on the retry
    (as :func:`evomerge.search.recover_stale_trials` writes it) and without the dead attempt's
    worker, recipe and scores."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {**{k: trial.user_attrs[k] for k in _CARRIED_ATTRS if k in trial.user_attrs},
                            "retry_of": trial.number}
        super().__call__(study, trial)


def open_storage(url: str | None, default_sqlite: Path | None = None, *,
                 heartbeat: Heartbeat | None = None) -> RDBStorage:
    """The storage at ``url`` (default: SQLite at ``default_sqlite``), with heartbeats on.

    Connects at once: an unreachable server, a missing database or driver, or a malformed URL
    raise :class:`EvomergeError` (one line naming the URL without its password, and the fix)
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
                              heartbeat_interval=beat.interval, grace_period=beat.grace_period,
                              heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=beat.max_retry))
        except ImportError as err:
            raise EvomergeError(f"storage {redact(url)}: its database driver is not installed "
                                f"({_first_line(err.__cause__ or err)}); install it (PostgreSQL: "
                                "pip install 'evomerge[postgres]')") from None
        except sqlalchemy.exc.ArgumentError as err:
            raise EvomergeError(f"storage {redact(url)} is not a database URL ({_first_line(err)}); "
                                "use e.g. postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB or "
                                "sqlite:///PATH/study.db") from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            fix = ("check that its folder exists and is writable" if url.startswith("sqlite")
                   else "check that the server is running and reachable from this machine and "
                        "that the URL's host, port, user, password and database are right")
            raise EvomergeError(f"cannot open storage {redact(url)}: {_first_line(err)}; {fix}") from None


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
        backend = getattr(url, "_backend", url)  # optuna wraps RDBStorage in a cache
        url = getattr(backend, "url", type(backend).__name__)
    return re.sub(r"(://[^:/@\s]+):\S*@", r"\1:***@", str(url))  # to the last @: passwords may hold one


# ---------------------------------------------------------------- the ask/tell loop
def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` after failing the trials whose worker stopped sending heartbeats (their
    parameters are enqueued again, so this ask may be the retry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # optuna warns that heartbeats are meant for optimize(): heartbeat() below does its part.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        optuna.storages.fail_stale_trials(study)
        return study.ask()


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record ``trial``'s heartbeat now and every interval until the block ends (nothing on
    storages without heartbeats). The first one is written before the block starts, so a worker
    killed inside the block always leaves a trial that will be found stale."""
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        yield
        return
    storage.record_heartbeat(trial._trial_id)
    with get_heartbeat_thread(trial._trial_id, storage):
        yield
