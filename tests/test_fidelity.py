"""Rungs over nested doc subsets (``fidelity:``): nesting, no doc scored twice, exact folding,
rung decisions shared through one SQLite storage, and a search end to end on tiny real Llamas."""

from __future__ import annotations

import collections
import json

import numpy as np
import optuna
import pytest
from fixtures import make_math_code_zoo
from optuna.trial import TrialState

from evomerge.candidate import load_causal_lm
from evomerge.evaluate import EvalConfig
from evomerge.search.fidelity import RungLadder, RungPruner, climb, stored_doc_items
from evomerge.search.run import RunOptions, run_search
from evomerge.search.samplers import make_pruner
from evomerge.search.study import default_storage
from evomerge.space import parse_space
from evomerge.space.rungs import Fidelity


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_math_code_zoo(tmp_path_factory.mktemp("fidelity_models"))


pytestmark = pytest.mark.usefixtures("hf_home_in_tmp")


def space_dict(zoo, **overrides):
    data = {
        "name": "t",
        "models": [{"name": "math", "model": str(zoo / "math")}, {"name": "code", "model": str(zoo / "code")}],
        "base_model": str(zoo / "base"),
        "method": "task_arithmetic",
        "eval": {"tasks": ["smoke_mc"], "limit": 6, "batch_size": 32},
        "top_k": 2,
        "seed": 3,
    }
    data.update(overrides)
    return data


def counting(lm, seen: collections.Counter) -> None:
    """Record (task, doc, choice) of every request the lm-eval LM answers (lm-eval's own
    Instances; their ``doc_id`` is a position in the run's subset, so the doc itself is kept)."""
    for kind in ("loglikelihood", "generate_until"):
        answer = getattr(lm, kind)

        def counted(requests, *a, _answer=answer, **k):
            seen.update((r.task_name, json.dumps(r.doc, sort_keys=True), r.idx) for r in requests)
            return _answer(requests, *a, **k)

        setattr(lm, kind, counted)


def test_rungs_are_nested_score_each_doc_once_and_fold_to_the_full_score(zoo, tmp_path):
    from evomerge.evaluate.hf import HFEvaluator

    cfg = EvalConfig(tasks=["smoke_mc", "smoke_gen:2"], limit=10, seed=5, batch_size=32)
    model, tok = load_causal_lm(zoo / "math")
    with HFEvaluator(cfg) as ev:
        full = ev.evaluate(model, tok)
        ladder = RungLadder.build(ev, (3, 6), seed=5)
        again = RungLadder.build(ev, (3, 6), seed=5)  # another worker derives the same docs
        assert ladder.doc_sets == again.doc_sets
        assert ladder.doc_sets[-1] == ev.runner.doc_ids() == ev.runner.samples
        for small, big in zip(ladder.doc_sets, ladder.doc_sets[1:]):
            for leaf, ids in small.items():
                assert set(ids) < set(big[leaf])
        assert [len(s["smoke_mc"]) for s in ladder.doc_sets] == [3, 6, 10]
        seen: collections.Counter = collections.Counter()
        counting(ev._lm, seen)
        study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
        trial = study.ask()
        result = climb(trial, ladder, model, tok)
        study.tell(trial, result.score)
    # every doc of the full set asked exactly once (one request per choice and doc)
    assert max(seen.values()) == 1
    docs = {leaf: ev.runner.task_dict["tasks"][leaf].eval_docs for leaf in ev.runner.samples}
    assert {(t, d) for t, d, _ in seen} == {(leaf, json.dumps(docs[leaf][i], sort_keys=True))
                                            for leaf, ids in ev.runner.samples.items() for i in ids}
    # the folded full rung is the plain evaluation, to the bit
    assert [t.value for t in result.tasks] == [t.value for t in full.tasks]
    assert result.score == full.score and result.n_samples == full.n_samples == 20
    stored = study.trials[0]
    assert stored.user_attrs["samples"] == 20 and stored.user_attrs["search_samples"] == 20
    assert stored.user_attrs["cheap_samples"] == 12  # the last cheap rung: 6 docs of each task
    assert sorted(stored.intermediate_values) == [0, 1]
    items = stored_doc_items(stored)
    assert {leaf: sorted(got) for leaf, got in items.items()} == ev.runner.samples


def test_rung_decisions_come_from_the_storage_shared_by_workers(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    pruner = make_pruner(Fidelity(rungs=(2, 4), reduction_factor=2, startup_trials=2))
    assert isinstance(pruner, RungPruner)
    a = optuna.create_study(storage=storage, study_name="s", direction="maximize", pruner=pruner)
    b = optuna.load_study(storage=storage, study_name="s", pruner=RungPruner(2, 2))  # a second worker

    def at_rung0(study, value, finish=None):
        trial = study.ask()
        trial.report(value, step=0)
        decision = trial.should_prune()
        if finish == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif finish == "complete":
            study.tell(trial, value)
        return decision

    assert not at_rung0(a, 0.1, "pruned")  # startup: fewer than 2 finished trials at rung 0
    running = a.ask()
    running.report(0.9, step=0)            # running in worker a: not part of the bar
    assert not at_rung0(b, 0.05)           # still 1 finished trial at rung 0
    assert not at_rung0(a, 0.8, "complete")
    # worker b sees a's finished trials (0.1, 0.8): the bar is their median, 0.45
    assert at_rung0(b, 0.3) and not at_rung0(b, 0.5)
    # another rung has its own bar
    trial = b.ask()
    trial.report(0.9, step=0)
    trial.report(0.2, step=1)
    assert not trial.should_prune()        # nobody finished with a rung-1 score yet


def test_search_with_rungs_counts_samples_per_trial(zoo, tmp_path):
    space = parse_space(space_dict(zoo, sampler="tpe", start=[],
                                   fidelity={"rungs": [2, 4], "reduction_factor": 2, "startup_trials": 1}))
    out = tmp_path / "run"
    summary = run_search(space, RunOptions(out_dir=out, trials=6))
    got = optuna.load_study(study_name="t", storage=default_storage(out)).get_trials()
    finished = [t for t in got if t.state.is_finished()]
    assert len(finished) == 6
    cost = {0: 2, 1: 4, 2: 6}  # docs scored by the rung a trial stopped at (cheap rungs: 2, 4 docs)
    for t in finished:
        rung = t.user_attrs["rung"]
        assert t.user_attrs["samples"] == cost[rung]
        assert (t.state == TrialState.COMPLETE) == (rung == 2)
        assert sorted(t.intermediate_values) == list(range(min(rung + 1, 2)))
    assert summary.samples == sum(t.user_attrs["samples"] for t in finished)
    assert summary.samples_without_pruning == 6 * 6


@pytest.mark.parametrize("fidelity, problem", [
    ({"rungs": [2, 6]}, "fidelity rung 6 must be below eval.limit 6"),
    ({"rungs": [4, 2]}, "must be increasing"),
    ({"rungs": [2, 4], "anchors": 2}, "fidelity.anchors 2 must be below the first rung 2"),
])
def test_bad_rungs_are_one_line_each(zoo, fidelity, problem):
    from evomerge.errors import EvomergeError

    with pytest.raises((EvomergeError, ValueError), match=problem):
        parse_space(space_dict(zoo, fidelity=fidelity))


def test_fidelity_and_pruning_together_are_refused(zoo):
    from evomerge.space import SpaceError

    with pytest.raises(SpaceError, match="pruning is the one-rung case of fidelity"):
        parse_space(space_dict(zoo, fidelity={"rungs": [2]}, pruning={"limit": 2}))


def test_two_worker_processes_share_rungs_and_score_each_doc_once_per_trial(zoo, tmp_path):
    """Two `evomerge worker`s on one SQLite study with rungs and the anchor rung: each trial's
    cost is the docs of the rung it stopped at, each once (a complete trial: the full set, not
    more); both workers' trials set the bars (every pruning decision equals the rule applied to
    the trials of both workers finished before it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import evomerge
    from evomerge.search.study import enqueue_start_points, open_storage, open_study

    space = parse_space(space_dict(zoo, name="w2", sampler="random", budget={"trials": 10},
                                   fidelity={"rungs": [2, 4], "reduction_factor": 2, "startup_trials": 2,
                                             "anchors": 1, "anchor_trials": 2}))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    enqueue_start_points(open_study(space, storage=open_storage(url), study_name="w2"), space)
    here = str(Path(evomerge.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "evomerge.cli", "worker", "--storage", url, "--study", "w2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-1500:] for o in outputs)

    trials = optuna.load_study(study_name="w2", storage=url).get_trials()
    finished = [t for t in trials if t.state.is_finished()]
    assert 10 <= len(finished) <= 11 and len(finished) == len(trials)
    assert {t.user_attrs["worker"]["pid"] for t in finished} == {p.pid for p in procs}
    assert any(t.state == TrialState.PRUNED for t in finished)
    for t in finished:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["samples"] == 6          # the full set, every doc once
            assert sum(len(d) for d in stored_doc_items(t).values()) == 6
        else:  # stopped at the anchor rung (1 doc) or a doc rung (its docs and the anchor)
            assert 1 <= t.user_attrs["samples"] <= {0: 1, 1: 3, 2: 5}[t.user_attrs["rung"]]
    # each stop is the rule (below the median of the finished trials' values at that rung, once
    # two have one) on the trials of both workers finished before it
    shared = False
    for t in (t for t in finished if t.state == TrialState.PRUNED):
        step = max(t.intermediate_values)
        peers = [p for p in finished if step in p.intermediate_values and p.datetime_complete < t.datetime_complete]
        assert len(peers) >= 2, t.number
        assert t.intermediate_values[step] < float(np.quantile([p.intermediate_values[step] for p in peers], 0.5))
        shared |= len({p.user_attrs["worker"]["pid"] for p in peers}) == 2
    assert shared
    # the anchor rung starts once two trials have full per-doc results
    assert any(0 in t.intermediate_values and t.user_attrs["rung"] >= 0 for t in finished)


def test_the_input_models_fill_the_anchor_bank_so_the_anchor_rung_starts_at_the_first_trial(zoo, tmp_path):
    """A new study scores its input models on the full search docs before the first trial and
    keeps their per-doc items; the anchor estimator's bank (anchor_trials models) takes them
    first, so with anchor_trials = the inputs it is fitted before any candidate finished, and a
    worker reading the study fits the same anchors."""
    from evomerge.evaluate import make_evaluator
    from evomerge.evaluate.estimator import AnchorEstimator
    from evomerge.search.anchor_inputs import anchor_input_samples
    from evomerge.search.fidelity import ANCHOR_INPUTS, AnchorRung

    space = parse_space(space_dict(zoo, name="ai", sampler="random", fidelity={
        "rungs": [2, 4], "startup_trials": 1, "anchors": 1, "anchor_trials": 3}))
    run_search(space, RunOptions(out_dir=tmp_path / "ai", trials=3))
    study = optuna.load_study(study_name="ai", storage=default_storage(tmp_path / "ai"))
    stored = study.user_attrs[ANCHOR_INPUTS]
    assert [name for name, _ in stored] == [m.name for m in space.all_models()] and len(stored) == 3
    assert anchor_input_samples(study) == 3 * 6  # each input once on the 6 search docs
    # an input's items are its own full evaluation
    model, tok = load_causal_lm(zoo / "math")
    with make_evaluator(space.eval) as ev:
        alone = ev.evaluate(model, tok)
        items = {leaf: {int(i): v for i, v in docs.items()} for leaf, docs in dict(stored)["math"].items()}
        assert ev.runner.fold(items).score == pytest.approx(alone.score, abs=1e-12)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert 0 in trials[0].intermediate_values  # the anchor rung from the very first candidate
    # a worker with a bigger bank: the inputs, then the first complete trial, as stored
    first = next(stored_doc_items(t) for t in trials if t.state == TrialState.COMPLETE)
    bank = [{leaf: {int(i): v for i, v in d.items()} for leaf, d in items.items()} for _, items in stored]
    def same(a, b) -> bool:
        return a.docs() == b.docs() and all(np.array_equal(a.leaves[k].bank, b.leaves[k].bank) for k in a.leaves)

    fitted = AnchorRung(2, 4, space.eval.seed).estimator(study)
    assert same(fitted, AnchorEstimator.fit([*bank, first], 2, seed=space.eval.seed))
    assert fitted.leaves["smoke_mc"].bank.shape == (6, 4)
    # a study its creator did not score inputs for (a worker-only study) fits on trials alone
    study.set_user_attr(ANCHOR_INPUTS, [])
    alone = AnchorRung(2, 1, space.eval.seed).estimator(study)
    assert same(alone, AnchorEstimator.fit([first], 2, seed=space.eval.seed))
