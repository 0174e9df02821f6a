"""Workers sharing one study: asking for a trial, heartbeats, and the one path for trials whose
worker died (joining a study is :func:`evomerge.search.run.run_worker`).

    trial = ask(study, beat)                 # retries trials of dead workers first, then asks
    with heartbeat(study, trial):            # "this worker is alive" every interval
        ...evaluate, study.tell(...)

A worker killed mid-trial (SIGKILL, OOM, preemption, a lost machine) leaves a RUNNING trial.
:func:`retry_dead_trials` finds such trials three ways: no heartbeat for the grace period (any
host), a worker process on this host that no longer exists, or no worker recorded at all for
the grace period (asked, then killed before it started). Each is failed with the error
``interrupted: ...`` and its parameters enqueued again (user attr ``retry_of``), at most
``max_retry`` times per candidate: a candidate that keeps killing its worker stops there.
Optuna records heartbeats only inside ``Study.optimize``; our loop is ask/tell, hence
:func:`ask` and :func:`heartbeat`.

Each joining worker claims a slot (:func:`claim_worker_slot`): 1 for the first worker to join a
study, 2 for the next, ... (the process that created the study is slot 0). Its sampler's seed is
derived from the space's seed and the slot (:func:`~evomerge.search.preflight.sampler_seed`), so
worker k of a study proposes the same candidates in every repetition of the run, and no two
workers share a seed.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import datetime
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from evomerge.adapters.optuna import (fail_if_running, heartbeat, heartbeat_stale_trial_ids,
                                      set_running_trial_attr, storage_of, trial_id)
from evomerge.search.study import Heartbeat

# User attrs a retried trial keeps from the trial it retries (the rest belong to that attempt).
_CARRIED_ATTRS = ("start_point",)
INTERRUPTED = "interrupted: the process running it stopped; its params were enqueued again"

WORKERS_SUFFIX = ".workers"  # the companion study that hands out worker slots

__all__ = ["ask", "claim_worker_slot", "heartbeat", "retry_dead_trials", "worker_id"]


def worker_id() -> dict[str, Any]:
    """What a trial records of the process running it (user attr ``worker``)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def claim_worker_slot(study: optuna.Study) -> int:
    """This process's slot among the workers of ``study`` (1, 2, ...; slot 0 is the process that
    created it). Slots are the trial numbers of a companion study ``<name>.workers`` in the same
    storage, plus one: the storage numbers trials atomically, so two workers never share a slot,
    on any database optuna supports. Each slot's trial records the worker's host and pid."""
    companion = optuna.create_study(storage=storage_of(study), load_if_exists=True,
                                    study_name=study.study_name + WORKERS_SUFFIX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        slot = companion.ask()
    slot.set_user_attr("worker", worker_id())
    companion.tell(slot, slot.number + 1)
    return slot.number + 1


def ask(study: optuna.Study, beat: Heartbeat) -> optuna.Trial:
    """``study.ask()`` after retrying the trials of dead workers (so this ask may be a retry)."""
    retry_dead_trials(study, beat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # optuna warns that heartbeats are meant for optimize(): heartbeat() does its part.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        return study.ask()


def retry_dead_trials(study: optuna.Study, beat: Heartbeat) -> list[int]:
    """Fail the RUNNING trials of dead workers and enqueue their params again (see the module
    docstring); returns their numbers. Several workers may call this at once: only the one whose
    FAIL lands retries a trial, so no trial is retried twice."""
    stale = heartbeat_stale_trial_ids(study)
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not (trial_id(t) in stale or _worker_gone(t, beat.grace_period)):
            continue
        retries = int(t.user_attrs.get("retries", 0))
        error = INTERRUPTED if retries < beat.max_retry else (
            f"interrupted: the process running it stopped, {retries + 1} times for these params; "
            f"not retried again (max retry {beat.max_retry}, EVOMERGE_MAX_RETRY)")
        if not set_running_trial_attr(study, t, "error", error) or not fail_if_running(study, t):
            continue  # it finished meanwhile, or another worker failed it first
        dead.append(t.number)
        if retries < beat.max_retry:
            requeue(study, t, retries=retries + 1)
    return dead


def requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial, *, retries: int | None = None) -> None:
    """Enqueue ``trial``'s params again (a dead or interrupted attempt), keeping what belongs to
    the candidate rather than the attempt (its start-point label) and naming the attempt it
    retries; ``retries`` counts attempts lost to dead workers."""
    attrs = trial.user_attrs
    carried = {k: attrs[k] for k in _CARRIED_ATTRS if k in attrs}
    extra = {"retries": retries} if retries is not None else {}
    study.enqueue_trial(trial.params, user_attrs={**carried, "retry_of": trial.number, **extra})


def _worker_gone(t: FrozenTrial, grace_period: float) -> bool:
    worker = t.user_attrs.get("worker")
    if not isinstance(worker, dict):
        # asked but not yet started: another worker may be just about to start it, so only a
        # trial older than the grace period counts as abandoned
        started = t.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > grace_period
    if worker.get("host") != socket.gethostname():
        return False  # another host's trial: its heartbeat tells
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
