"""Samplers for big spaces and parallel workers, on real SQLite studies: CMA-ES's population, mean
and IPOP restarts; proposals that account for running trials (GP, TPE); worker slots and seeds
with real `evomerge worker` processes sharing one SQLite storage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from spaces import ties_per_layer_space

import evomerge
from evomerge.adapters.optuna import RestartingCmaEsSampler, _publish
from evomerge.search.preflight import sampler_seed
from evomerge.search.samplers import make_sampler
from evomerge.search.study import enqueue_start_points, open_storage, open_study
from evomerge.search.workers import WORKERS_SUFFIX
from evomerge.space import distributions, equal_params, parse_space


pytestmark = pytest.mark.usefixtures("optuna_warnings_only")


def big_space(zoo, **overrides):
    """TIES weights and densities per layer and per filter, and lambda: 25 numeric parameters."""
    return parse_space(ties_per_layer_space(zoo, **{"budget": {"trials": 8}, **overrides}))


def synthetic(params: dict, optimum: float = 0.3) -> float:
    """A smooth stand-in fitness (this file tests the samplers, not the evaluation)."""
    return -sum((v - optimum) ** 2 for v in params.values() if isinstance(v, float))


def test_cmaes_for_a_big_space_starts_at_the_start_point_with_hansens_population(zoo, tmp_path):
    # named: the default for this space is coarse-to-fine (tests/test_samplers_coarse.py), whose
    # fine phase is this CMA-ES
    space = big_space(zoo, sampler="cmaes")
    numeric = {n for n, d in distributions(space).items() if not isinstance(d, optuna.distributions.CategoricalDistribution)}
    assert len(numeric) == 25
    # the sampler's bookkeeping, not the database, is under test here: SQLite commits 25 params
    # per trial at ~25 ms each on CI disks (the worker test below uses SQLite)
    study = open_study(space, storage=optuna.storages.InMemoryStorage(), study_name="big")
    sampler = study.sampler
    assert isinstance(sampler, RestartingCmaEsSampler)
    popsize = 4 + int(3 * math.log(25))
    assert popsize == 13 and sampler._popsize == popsize
    # the mean: the equal point, one initial step (a sixth of the range) inside each bound
    equal = equal_params(space)
    assert sampler._x0 == pytest.approx({n: min(equal[n], 0.85) if n.endswith("density") else equal[n]
                                         for n in numeric})
    assert equal["layers_00_00.mlp.math.density"] == 1.0 and equal["lambda"] == 1.0
    enqueue_start_points(study, space)

    for _ in range(popsize + 2):
        trial = study.ask(distributions(space))
        study.tell(trial, synthetic(trial.params))
    trials = study.get_trials()
    assert trials[0].params == equal_params(space) and trials[0].user_attrs["start_point"] == "equal"
    generations = [t.system_attrs.get("cma:generation") for t in trials]
    # CMA-ES starts once the first trial (the start point) taught optuna the search space; a
    # generation is `popsize` trials
    assert generations == [None] + [0] * popsize + [1]
    # the first generation is drawn around the start point with a sixth of each range as step
    first = np.array([[t.params[n] for n in sorted(numeric)] for t in trials[1:popsize]])
    x0 = np.array([sampler._x0[n] for n in sorted(numeric)])
    lows = np.array([distributions(space)[n].low for n in sorted(numeric)])
    highs = np.array([distributions(space)[n].high for n in sorted(numeric)])
    spread = (first - x0) / (highs - lows)
    assert abs(spread.mean()) < 0.05 and 0.08 < spread.std() < 0.25


def test_ipop_restarts_double_the_population_and_every_worker_agrees():
    """On a plateau CMA-ES converges (its values stop changing); the next trial starts a new run
    with twice the population. Two samplers with their own seeds (two workers) share the
    storage and agree on the run each trial belongs to."""
    storage = optuna.storages.InMemoryStorage()  # one storage, two studies reading it (see above)
    samplers = [make_sampler("cmaes", seed=sampler_seed(1, None, worker=k)) for k in (1, 2)]
    studies = [optuna.create_study(storage=storage, study_name="p", load_if_exists=True, sampler=s,
                                   direction="maximize") for s in samplers]
    for i in range(150):
        study = studies[i % 2]
        trial = study.ask({"a": optuna.distributions.FloatDistribution(0, 1),
                           "b": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(trial, 1.0)  # a plateau: every candidate scores the same
    trials = studies[0].get_trials()
    runs = [samplers[0]._run_of(t) for t in trials]
    assert runs == sorted(runs) and runs[-1] >= 1, runs  # restarted, never back to an older run
    first_restart = runs.index(1)
    base = 4 + int(3 * math.log(2))
    assert first_restart >= base * 10  # not before CMA-ES's own stopping rules allow it
    # run 1's generations are twice as large: its first generation holds 2 * base trials
    generations = [t.system_attrs.get("cma:ipop1:generation") for t in trials[first_restart:]]
    assert generations[:2 * base + 1] == [0] * (2 * base) + [1]
    assert {samplers[1]._run_of(t) for t in trials} == set(runs)


def test_gp_proposals_account_for_running_trials(tmp_path):
    """GP's next proposal with no trial running is P (seeded: the same twice); with a trial
    still running at P (another worker's), it proposes elsewhere."""
    storage = f"sqlite:///{tmp_path / 'gp.db'}"
    dists = {"x": optuna.distributions.FloatDistribution(0, 1), "y": optuna.distributions.FloatDistribution(0, 1)}
    study = optuna.create_study(storage=storage, study_name="g", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        t = study.ask(dists)
        study.tell(t, synthetic(t.params, 0.6))

    def proposal(pruning: bool) -> dict:
        probe = optuna.load_study(study_name="g", storage=storage,
                                  sampler=make_sampler("gp", seed=4, pruning=pruning))
        trial = probe.ask(dists)
        params = dict(trial.params)
        probe.tell(trial, state=TrialState.FAIL)  # not an observation: the next probe sees the same data
        return params

    # optuna's GP does this (qLogEI over the running points); ours must pass them through
    # PrunedAsComplete, the view PrunedAwareGPSampler reads the study through
    p = proposal(pruning=True)
    assert proposal(pruning=True) == p
    study.enqueue_trial(p)  # another worker's trial at P, not finished
    running = study.ask(dists)
    assert running.params == p
    q = proposal(pruning=True)
    assert math.dist(q.values(), p.values()) > 1e-3, (p, q)
    assert make_sampler("tpe", seed=0)._constant_liar


def test_gp_moves_off_a_point_another_worker_published_while_it_computed(tmp_path):
    """Two workers asking at the same moment fit the same data; the one that compares last
    sees the other's published point and proposes again."""
    storage = f"sqlite:///{tmp_path / 'race.db'}"
    dists = {"x": optuna.distributions.FloatDistribution(0, 1), "y": optuna.distributions.FloatDistribution(0, 1)}
    study = optuna.create_study(storage=storage, study_name="r", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(6):
        t = study.ask(dists)
        study.tell(t, synthetic(t.params, 0.6))
    other = study.ask()  # another worker's trial, its proposal not yet published
    sampler = make_sampler("gp", seed=4)
    real, proposals = sampler._sample_relative_impl, []

    def racing(view, completed, running, space):
        point = real(view, completed, running, space)
        if not proposals:  # the other worker publishes the same point meanwhile
            _publish(study, other, point, 0)
        proposals.append(point)
        return point

    sampler._sample_relative_impl = racing
    mine = optuna.load_study(study_name="r", storage=storage, sampler=sampler).ask(dists)
    assert len(proposals) == 2 and proposals[1] != proposals[0]
    assert mine.params == proposals[1]
    # what other workers read: each trial's own point
    published = {t.number: t.system_attrs["gp:relative_params:0"] for t in study.get_trials()[-2:]}
    assert published == {other.number: json.dumps(proposals[0]), mine.number: json.dumps(proposals[1])}


def test_worker_processes_on_one_sqlite_storage_claim_distinct_slots(zoo, tmp_path):
    space = big_space(zoo, name="w", method="task_arithmetic", layer_granularity=None, filters=[],
                      budget={"trials": 8})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(space, storage=open_storage(url), study_name="w")
    enqueue_start_points(study, space)
    here = str(Path(evomerge.__file__).parents[1])  # the workers run this checkout's evomerge
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
           "EVOMERGE_HEARTBEAT_INTERVAL": "1", "EVOMERGE_GRACE_PERIOD": "30"}
    procs = [subprocess.Popen([sys.executable, "-m", "evomerge.cli", "worker", "--storage", url, "--study", "w"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for _ in range(3)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-1500:] for o in outputs)

    slots = optuna.load_study(study_name="w" + WORKERS_SUFFIX, storage=url).get_trials()
    assert sorted(t.number + 1 for t in slots) == [1, 2, 3]
    assert sorted(t.user_attrs["worker"]["pid"] for t in slots) == sorted(p.pid for p in procs)
    seeds = {sampler_seed(space.seed, None, worker=t.number + 1) for t in slots}
    assert len(seeds) == 3 and space.seed not in seeds

    trials = optuna.load_study(study_name="w", storage=url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 8 <= len(complete) <= 8 + 2 and len(complete) == len(trials)
    assert {t.user_attrs["worker"]["pid"] for t in complete} <= {p.pid for p in procs}
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params)  # no candidate proposed twice
