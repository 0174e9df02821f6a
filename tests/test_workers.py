"""Many workers on one study and crash-safe resume: real worker processes, real SIGKILLs.

Three `evomerge worker` processes share a study on a private PostgreSQL server (tests/pg.py); one
is killed mid-trial and its trial must be failed by the heartbeat and retried by the others.
A single `evomerge search` on SQLite killed mid-run must resume where it stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from fixtures import load_state
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from pg import postgres_url  # noqa: F401  (the fixture)
from spaces import math_code_space

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.search.study import CONNECT_TIMEOUT, Heartbeat, enqueue_start_points, open_storage, open_study, redact
from evomerge.space import SearchSpace, parse_space, trial_recipe
from merge_engine.recipe import MergeRecipe, load_recipe, parse_recipe

# Short heartbeats so a dead worker's trial is retried within seconds, not a minute.
FAST_HEARTBEAT = {"EVOMERGE_HEARTBEAT_INTERVAL": "1", "EVOMERGE_GRACE_PERIOD": "2"}


def space_dict(zoo: Path, trials: int, limit: int = 4) -> dict:
    return math_code_space(zoo, limit=limit, name="w", budget={"trials": trials}, top_k=2, seed=3)


def process_env(tmp_path: Path) -> dict[str, str]:
    # One torch thread per process: several processes share the 2 cores of CI.
    return {**os.environ, **FAST_HEARTBEAT, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}


def evomerge(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", *args]


def wait_for(what: str, check: Callable[[], object], timeout: float, logs: list[Path]) -> object:
    """Poll ``check`` until it returns something truthy; fail with the processes' logs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := check():
            return got
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.is_file())
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class TrialWatch:
    """The trials of a study another process is running, read cheaply (one storage, kept)."""

    def __init__(self, url: str, study: str) -> None:
        self.url, self.study = url, study
        self.storage: optuna.storages.RDBStorage | None = None

    def __call__(self) -> list[FrozenTrial]:
        import sqlalchemy.exc

        try:
            if self.storage is None:
                self.storage = optuna.storages.RDBStorage(self.url)
            study_id = self.storage.get_study_id_from_name(self.study)
            return self.storage.get_all_trials(study_id, deepcopy=False)
        except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError,
                optuna.exceptions.StorageInternalError):
            # no study yet, SQLite locked by the (maybe stopped) writer, or both processes creating
            # the schema at once (the child wins; the next call looks again)
            return []


def running_trial_of(trials: list[FrozenTrial], pid: int) -> FrozenTrial | None:
    """The trial process ``pid`` is evaluating (its recipe already recorded), if any."""
    return next((t for t in trials if t.state == TrialState.RUNNING and "recipe" in t.user_attrs
                 and (t.user_attrs.get("worker") or {}).get("pid") == pid), None)


def kill_mid_trial(proc: subprocess.Popen, trials: Callable[[], list[FrozenTrial]],
                   ready: Callable[[list[FrozenTrial]], bool], logs: list[Path],
                   sig: int = signal.SIGKILL) -> FrozenTrial:
    """Send ``sig`` (SIGKILL, or SIGINT for Ctrl-C) to ``proc`` while it evaluates a trial (once
    ``ready(trials)``); returns that trial.

    The process is stopped (SIGSTOP) before its trial is read, so the trial cannot finish
    between the check and the kill."""

    def stopped_mid_trial() -> FrozenTrial | None:
        if not running_trial_of(trials(), proc.pid):
            return None
        os.kill(proc.pid, signal.SIGSTOP)
        now = trials()
        if ready(now) and (trial := running_trial_of(now, proc.pid)):
            return trial
        os.kill(proc.pid, signal.SIGCONT)
        return None

    trial = wait_for(f"process {proc.pid} to be mid-trial", stopped_mid_trial, 90, logs)
    os.kill(proc.pid, sig)
    if sig != signal.SIGKILL:
        os.kill(proc.pid, signal.SIGCONT)  # a stopped process handles its SIGINT once continued
    proc.wait(timeout=60)
    return trial


def byte_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def assert_recipes_reproduce(trials: list[FrozenTrial], space: SearchSpace, tmp: Path) -> None:
    """Each recorded recipe is the one its params give; merged on disk it equals, byte for byte,
    the recipe applied in memory (on a fresh model, and on one long-lived model as a worker does)."""
    from evomerge.candidate import load_causal_lm
    from merge_engine.apply import InMemoryMerger
    from merge_engine.merge import run_merge

    def resident() -> torch.nn.Module:
        return load_causal_lm(space.base_model.model, dtype=space.dtype)[0]

    with InMemoryMerger(resident()) as long_lived:
        for t in trials:
            recipe: MergeRecipe = parse_recipe(yaml.safe_load(t.user_attrs["recipe"]))
            assert recipe.to_yaml() == trial_recipe(space, FixedTrial(t.params)).to_yaml(), t.number
            on_disk = load_state(run_merge(recipe, tmp / f"trial{t.number}", device="cpu").out_dir)
            with InMemoryMerger(resident()) as fresh:
                fresh.apply(recipe)
                long_lived.apply(recipe)
                for merger in (fresh, long_lived):
                    state = merger.model.state_dict()
                    assert set(state) == set(on_disk), t.number
                    bad = [n for n, v in on_disk.items() if not byte_equal(state[n], v)]
                    assert not bad, f"trial {t.number}: in-memory merge differs from disk in {bad[:3]}"


@pytest.mark.postgres
def test_workers_share_a_study_and_retry_a_killed_workers_trial(zoo, tmp_path, postgres_url):  # noqa: F811
    budget, name = 24, "workers"
    space = parse_space(space_dict(zoo, budget))
    study = open_study(space, storage=open_storage(postgres_url, heartbeat=Heartbeat(1, 2)), study_name=name)
    enqueue_start_points(study, space)

    env = process_env(tmp_path)
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = []
    for log in logs:
        with log.open("w") as out:
            procs.append(subprocess.Popen(evomerge("worker", "--storage", postgres_url, "--study", name),
                                          stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    victim, survivors = procs[0], procs[1:]
    try:
        killed = kill_mid_trial(victim, TrialWatch(postgres_url, name), lambda _: True, logs)
        for proc in survivors:
            proc.wait(timeout=150)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in survivors] == [0, 0], "\n".join(p.read_text()[-2000:] for p in logs[1:])
    workers = {p.pid for p in survivors}

    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    if trials[killed.number].state == TrialState.RUNNING:
        # On a quiet machine the survivors can finish the budget within the grace period, so no
        # one asked after the dead worker's trial went stale. A worker joining later finds it.
        time.sleep(3)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        late_log = tmp_path / "late_worker.log"
        logs.append(late_log)
        with late_log.open("w") as out:
            late = subprocess.Popen(evomerge("worker", "--storage", postgres_url, "--study", name,
                                             "--trials", str(done + 1)),
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        assert late.wait(timeout=150) == 0, late_log.read_text()[-2000:]
        workers.add(late.pid)
        budget += 1
        trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    # A worker asks for no new trial once the study has `budget` finished ones; both survivors may
    # be mid-trial when it gets there, so one trial more is fine.
    assert budget <= len(by_state[TrialState.COMPLETE]) <= budget + 1
    assert [t.number for t in trials] == list(range(len(trials)))  # no number handed out twice

    dead = trials[killed.number]
    # If it is still RUNNING, the survivors finished the budget within the grace period and
    # nobody asked for a trial after it: raise the budget.
    assert dead.state == TrialState.FAIL and dead.user_attrs["worker"]["pid"] == victim.pid
    # evomerge.search.workers.retry_dead_trials marks the retry with retry_of, whether it found the
    # trial by its heartbeat or (a late-joining worker on this host) by its dead pid.
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number
               or t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1, f"trial {killed.number} of the killed worker was not retried: {dead.state}"
    retry = retries[0]
    assert retry.user_attrs["retry_of"] == killed.number and retry.params == dead.params
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["worker"]["pid"] in workers
    assert [t.number for t in by_state[TrialState.FAIL]] == [dead.number]  # nothing else failed
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]

    assert_recipes_reproduce(by_state[TrialState.COMPLETE], space, tmp_path / "merged")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "ctrl-c"])
def test_killed_search_resumes_with_the_same_command(zoo, tmp_path, sig):
    """`kill -9` (or Ctrl-C) of `evomerge search` on its default SQLite storage, then the same
    command again: finished trials are kept as they were, the killed one is retried, the run
    reaches exactly its budget and every result file is whole."""
    # Every doc and batches of 4: a trial lasts long enough to be caught mid-way (with 4 docs a
    # trial took 0.1 s once evaluation got faster, and the kill could miss every trial).
    budget = 8
    space_file = tmp_path / "space.yaml"
    data = space_dict(zoo, budget, limit=None)
    data["eval"]["batch_size"] = 4
    space_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    command = evomerge("search", str(space_file), "--out", str(out))
    storage, log = f"sqlite:///{out / 'study.db'}", tmp_path / "search.log"

    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=process_env(tmp_path))
    try:
        killed = kill_mid_trial(
            proc, TrialWatch(storage, "w"), lambda trials: sum(t.state == TrialState.COMPLETE for t in trials) >= 2,
            [log], sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = [(t.number, t.params, t.values) for t in optuna.load_study(study_name="w", storage=storage)
              .get_trials(states=(TrialState.COMPLETE,))]

    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in log.read_text().splitlines()[-1]
    again = subprocess.run(command, capture_output=True, text=True, env=process_env(tmp_path), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming study w ({len(before)} finished trials)" in again.stderr

    study = optuna.load_study(study_name="w", storage=storage)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [(t.number, t.params, t.values) for t in complete[:len(before)]] == before
    assert len(complete) == budget
    assert [t.number for t in trials] == list(range(len(trials)))
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL and "interrupted" in dead.user_attrs["error"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert all(t.params != dead.params for t in trials if t.number > killed.number and t not in retry)
    assert len(retry) == 1 and retry[0].params == dead.params and retry[0].state == TrialState.COMPLETE

    with sqlite3.connect(out / "study.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    table = pd.read_csv(out / "trials.csv")
    assert list(table["number"]) == [t.number for t in trials]
    assert list(table["state"]) == [t.state.name for t in trials]
    best = sorted((out / "best").glob("*.yaml"))
    assert len(best) == 2 and all(load_recipe(p).models for p in best)
    assert not list(out.rglob(".*.tmp")) and not list(out.glob(".best.*"))  # no half-written files


# ---------------------------------------------------------------- storage errors and settings
def test_unreachable_storage_is_one_line_naming_the_url_without_its_password(capsys):
    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg2://evo:s3cret@127.0.0.1:{port}/study"
    start = time.monotonic()
    assert main(["worker", "--storage", url, "--study", "x"]) == 3  # storage errors: exit code 3
    err = capsys.readouterr().err
    assert time.monotonic() - start < CONNECT_TIMEOUT
    assert err.count("\n") == 1 and "Traceback" not in err and "s3cret" not in err
    assert f"evo:***@127.0.0.1:{port}/study" in err and "server is running" in err


def test_a_server_that_never_answers_times_out():
    with socket.socket() as s:  # accepts the TCP connection (backlog) but never speaks
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        start = time.monotonic()
        with pytest.raises(EvomergeError, match="timeout expired"):
            open_storage(f"postgresql+psycopg2://evo@127.0.0.1:{s.getsockname()[1]}/study")
        assert time.monotonic() - start < CONNECT_TIMEOUT + 3


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://u:p%40ss@h:5432/d", "postgresql+psycopg2://u:***@h:5432/d"),
    ("mysql://u:pw@h/d?charset=utf8", "mysql://u:***@h/d?charset=utf8"),
    ("postgresql://u@h/d", "postgresql://u@h/d"),
    ("sqlite:////runs/x/study.db", "sqlite:////runs/x/study.db"),
])
def test_redact(url, shown):
    assert redact(url) == shown


def test_bad_urls_name_the_fix(tmp_path):
    with pytest.raises(EvomergeError, match=r"contains '@'; percent-encode") as err:
        open_storage("postgresql://u:p@ss@h/d")
    assert "ss@h" not in str(err.value)
    with pytest.raises(EvomergeError, match="not a database URL"):
        open_storage("runs/x/study.db")
    with pytest.raises(EvomergeError, match="folder exists"):
        open_storage(f"sqlite:///{tmp_path}/missing/study.db")


def test_default_sqlite_storage_has_heartbeats_and_a_busy_timeout(tmp_path):
    storage = open_storage(None, tmp_path / "study.db")
    assert storage.url == f"sqlite:///{tmp_path / 'study.db'}"
    assert (storage.heartbeat_interval, storage.grace_period) == (Heartbeat.interval, Heartbeat.grace_period)
    assert storage.engine_kwargs["connect_args"]["timeout"] >= 30


def test_heartbeat_settings_from_the_environment():
    assert Heartbeat.from_env({}) == Heartbeat()
    assert Heartbeat.from_env(FAST_HEARTBEAT) == Heartbeat(1, 2)
    assert Heartbeat.from_env({"EVOMERGE_HEARTBEAT_INTERVAL": "30"}).grace_period == 180
    with pytest.raises(EvomergeError, match="EVOMERGE_GRACE_PERIOD"):
        Heartbeat.from_env({"EVOMERGE_GRACE_PERIOD": "soon"})
    with pytest.raises(EvomergeError, match="grace period > interval"):
        Heartbeat(interval=10, grace_period=10)


def test_a_candidate_that_keeps_killing_its_worker_stops_after_max_retry(tmp_path):
    """Same host, dead pid: the trial is failed and retried (``retry_of``), until the candidate
    has been retried ``max_retry`` times; then it stays FAIL and is not enqueued again."""
    from optuna.distributions import FloatDistribution

    from evomerge.search.workers import retry_dead_trials

    beat = Heartbeat(interval=1, grace_period=2, max_retry=2)
    study = optuna.create_study(storage=open_storage(None, tmp_path / "study.db", heartbeat=beat))
    study.enqueue_trial({"x": 0.25}, user_attrs={"start_point": "equal"})
    numbers = []
    for _ in range(4):
        trial = study.ask({"x": FloatDistribution(0, 1)})
        assert trial.params == {"x": 0.25}
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": _dead_pid()})
        numbers.append(trial.number)
        assert retry_dead_trials(study, beat) == [trial.number]
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            break
    trials = study.get_trials()
    assert numbers == [0, 1, 2] and all(t.state == TrialState.FAIL for t in trials)
    assert [t.user_attrs.get("retry_of") for t in trials] == [None, 0, 1]
    assert all(t.user_attrs["start_point"] == "equal" for t in trials)
    assert "interrupted" in trials[0].user_attrs["error"]
    assert "not retried again" in trials[2].user_attrs["error"]
    assert retry_dead_trials(study, beat) == []  # nothing is failed or retried twice


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
