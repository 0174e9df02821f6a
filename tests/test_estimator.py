"""The anchor estimator: on synthetic per-doc matrices with known structure, and as the lowest
rung of a real small search (tiny Llamas, real lm-eval, SQLite)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from spaces import math_code_space

from evomerge.evaluate.estimator import AnchorEstimator
from evomerge.search.fidelity import stored_doc_items
from evomerge.search.run import RunOptions, run_search
from evomerge.search.study import default_storage
from evomerge.space import parse_space


def block_models() -> list[dict[str, dict[int, float]]]:
    """40 docs in 3 blocks with one correctness pattern each across 4 models:
    docs 0-19 every model right, 20-29 only models 0 and 1, 30-39 only model 3."""
    out = []
    for m in range(4):
        row = {d: 1.0 for d in range(20)}
        row |= {d: float(m in (0, 1)) for d in range(20, 30)}
        row |= {d: float(m == 3) for d in range(30, 40)}
        out.append({"t": row})
    return out


@pytest.mark.parametrize("method", ["completion", "stratified"])
def test_anchors_go_where_models_differ_and_recover_a_known_model(method):
    models = block_models()
    est = AnchorEstimator.fit(models, n_anchors=4, seed=1, method=method)
    anchors = est.docs()["t"]
    assert len(anchors) == est.n_docs == 4
    # Neyman allocation: none for the block every model gets right, 2 for each block that separates them
    assert [sum(lo <= d < hi for d in anchors) for lo, hi in ((0, 20), (20, 30), (30, 40))] == [0, 2, 2]
    for m in models:  # a candidate answering like a known model: its full score from 4 docs
        done = est.complete({"t": {d: m["t"][d] for d in anchors}})
        assert sorted(done["t"]) == list(range(40))
        # (completion leaves the other models a small weight: exp(-gap/bandwidth))
        assert np.mean(list(done["t"].values())) == pytest.approx(np.mean(list(m["t"].values())), abs=0.01)
    assert AnchorEstimator.fit(models, 4, seed=1, method=method).docs() == est.docs()  # seeded


def test_all_docs_as_anchors_is_exact_and_bad_input_is_one_line():
    rng = np.random.default_rng(0)
    models = [{"t": {d: float(rng.random() < 0.5) for d in range(12)}} for _ in range(3)]
    est = AnchorEstimator.fit(models, n_anchors=50)
    other = {"t": {d: float(rng.random() < 0.5) for d in range(12)}}
    assert est.complete(other) == other
    with pytest.raises(ValueError, match="at least one model"):
        AnchorEstimator.fit([], 3)
    with pytest.raises(ValueError, match="different docs of t"):
        AnchorEstimator.fit([models[0], {"t": {0: 1.0}}], 3)
    with pytest.raises(ValueError, match="unknown estimator method"):
        AnchorEstimator.fit(models, 3, method="irt")


def test_uninformative_patterns_give_an_unbiased_stratified_estimate():
    """One pattern for every doc (a single model): anchors are a random sample, each standing
    for an equal share, so the mean estimate over many seeds is the true mean."""
    rng = np.random.default_rng(3)
    truth = {"t": {d: float(rng.random() < 0.3) for d in range(100)}}
    fit = [{"t": {d: 1.0 for d in range(100)}}]
    est = [np.mean(list(AnchorEstimator.fit(fit, 10, seed=s, method="stratified").complete(
        {"t": {d: truth["t"][d] for d in AnchorEstimator.fit(fit, 10, seed=s).docs()["t"]}})["t"].values()))
        for s in range(200)]
    assert np.mean(est) == pytest.approx(np.mean(list(truth["t"].values())), abs=0.02)


def test_anchor_rung_in_a_real_search_scores_no_doc_twice(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # a bank of 5: the 3 input models (scored when the study is created), then 2 trials
    space = parse_space(math_code_space(
        zoo, limit=8, sampler="tpe", seed=3, start=[],
        fidelity={"rungs": [4], "anchors": 3, "anchor_trials": 5, "startup_trials": 50}))
    out = tmp_path / "run"
    run_search(space, RunOptions(out_dir=out, trials=4))
    got = sorted(optuna.load_study(study_name="t", storage=default_storage(out)).get_trials(),
                 key=lambda t: t.number)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in got)
    first, later = got[:2], got[2:]
    assert all(0 not in t.intermediate_values for t in first)  # before the estimator is fitted
    study = optuna.load_study(study_name="t", storage=default_storage(out))
    inputs = [{leaf: {int(i): v for i, v in d.items()} for leaf, d in items.items()}
              for _, items in study.user_attrs["anchor_inputs"]]
    est = AnchorEstimator.fit([*inputs, *(stored_doc_items(t) for t in first)], 3, seed=space.eval.seed)
    for t in later:
        items = stored_doc_items(t)
        assert t.user_attrs["samples"] == 8  # anchors, then the 4-doc rung, then the rest: 8 docs once
        assert sorted(items["smoke_mc"]) == sorted(stored_doc_items(first[0])["smoke_mc"])
        anchors = est.docs()["smoke_mc"]
        done = est.complete({"smoke_mc": {d: items["smoke_mc"][d] for d in anchors}})
        assert t.intermediate_values[0] == pytest.approx(np.mean(list(done["smoke_mc"].values())))
        assert sorted(t.intermediate_values) == [0, 1]
