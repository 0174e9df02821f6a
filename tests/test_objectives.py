"""Objectives beyond lm-eval on tiny real Llamas, real lm-eval tasks and real SQLite studies:
Python callables (module:function), cost objectives (params, layers, tokens_generated), their
directions, load-time problems, failed candidates, the report table and the plot labels."""

from __future__ import annotations

import functools
import textwrap

import optuna
import pytest
import torch
from optuna.trial import TrialState
from spaces import math_code_space

from evomerge.candidate import load_causal_lm
from evomerge.errors import EvomergeError
from evomerge.evaluate import EvalConfig, EvalResult, make_evaluator
from evomerge.evaluate.callable import GenerationCounter, TokenCountingEvaluator
from evomerge.results.plot_data import objective_label
from evomerge.results.report import report_table
from evomerge.search.objectives import objective_values
from evomerge.search.run import RunOptions, run_search
from evomerge.search.study import default_storage
from evomerge.space import SpaceError, parse_space

SCORERS = '''
import torch

CALLS = {"n": 0}

def size_hint(model, tokenizer):
    """A float: the mean absolute value of the embedding (varies with the merge)."""
    assert not torch.is_grad_enabled()
    return model.get_input_embeddings().weight.abs().mean().item()

def several(model, tokenizer):
    w = model.get_input_embeddings().weight
    return {"mean": w.mean().item(), "vocab": float(len(tokenizer))}

def flaky(model, tokenizer):
    CALLS["n"] += 1
    if CALLS["n"] % 2 == 0:
        raise RuntimeError("scorer broke on this one")
    return 1.0

def wrong(model, tokenizer):
    return "high"

def one_arg(model):
    return 0.0
'''


@pytest.fixture(autouse=True)
def _scorers(tmp_path, monkeypatch):
    """A user's scorer module, importable by name (a fresh module per test)."""
    (tmp_path / "scorers_t15.py").write_text(textwrap.dedent(SCORERS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "scorers_t15", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from evomerge.evaluate.callable import resolve_callable

    resolve_callable.cache_clear()


space_dict = functools.partial(math_code_space, name="o", top_k=1, seed=5)


def test_objective_kinds_directions_and_load_time_problems(zoo):
    space = parse_space(space_dict(zoo, objectives=[
        "score", "params", "layers", "scorers_t15:size_hint", "scorers_t15:several[mean]:minimize"]))
    assert space.directions == ["maximize", "minimize", "minimize", "maximize", "minimize"]

    cases = {
        "nope_module_t15:f": "cannot import module nope_module_t15 (ModuleNotFoundError",
        "scorers_t15:missing": "module scorers_t15 has no function missing",
        "scorers_t15:one_arg": "one_arg must take (model, tokenizer)",
        "scorers_t15:size hint": "is not module:function",
        "bogus": "is neither 'score' nor a task in eval.tasks ['smoke_mc'], nor a cost",
    }
    for objective, expected in cases.items():
        with pytest.raises(SpaceError) as err:
            parse_space(space_dict(zoo, objectives=["score", objective]))
        assert len(err.value.problems) == 1 and expected in err.value.problems[0], err.value.problems
    # both backends count generated tokens (vLLM: tests/test_vllm_tokens.py)
    assert parse_space(space_dict(zoo, objectives=["score", "tokens_generated"], eval={
        "tasks": ["smoke_mc"], "backend": "vllm"})).objectives == ("score", "tokens_generated")
    with pytest.raises(SpaceError, match="pruning ranks candidates by their eval score, not by params"):
        parse_space(space_dict(zoo, objectives=["params"], eval={"tasks": ["smoke_mc"], "limit": 6},
                               pruning={"limit": 2}))


def test_search_with_callable_and_cost_objectives(zoo, tmp_path):
    names = ["score", "params", "layers", "scorers_t15:size_hint", "scorers_t15:several[vocab]",
             "scorers_t15:several[mean]:minimize"]
    space = parse_space(space_dict(zoo, objectives=names, sampler="random"))
    out = tmp_path / "run"
    run_search(space, RunOptions(out_dir=out, trials=3))
    study = optuna.load_study(study_name="o", storage=default_storage(out))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [d.name.lower() for d in study.directions] == space.directions

    model, tokenizer = load_causal_lm(zoo / "base")
    n_params = sum(p.numel() for p in model.parameters())
    for t in trials:
        score, params, layers, hint, vocab, mean = t.values
        assert params == n_params and layers == model.config.num_hidden_layers == 2
        assert vocab == len(tokenizer)
        assert hint > 0 and 0 <= score <= 1
    assert len({t.values[3] for t in trials}) == 3  # the callable saw each candidate's own weights
    # the first trial is the equal-weights start point: recompute its callable value
    from merge_engine.recipe import parse_recipe
    import yaml

    from evomerge.candidate import Candidate

    with Candidate.load(zoo / "base") as cand:
        cand.apply(parse_recipe(yaml.safe_load(trials[0].user_attrs["recipe"])))
        expected = cand.model.get_input_embeddings().weight.abs().mean().item()
    assert trials[0].values[3] == pytest.approx(expected, rel=1e-6)

    table = report_table(study, k=1)
    header = table.splitlines()[2]
    assert "params" in header and "scorers_t15:several[mean]:minimize" in header
    assert f"{n_params}" in table.splitlines()[-1]
    assert objective_label(study, 1) == "parameter count (lower is better)"
    assert objective_label(study, 5) == "scorers_t15:several[mean] (Python callable) (lower is better)"
    assert "value_params" in (out / "trials.csv").read_text().splitlines()[0]


def test_a_failing_or_wrong_callable_fails_that_candidate_not_the_search(zoo, tmp_path):
    space = parse_space(space_dict(zoo, objectives=["scorers_t15:flaky"], sampler="random"))
    out = tmp_path / "flaky"
    summary = run_search(space, RunOptions(out_dir=out, trials=3))
    trials = optuna.load_study(study_name="o", storage=default_storage(out)).get_trials()
    assert summary.finished == 3 and summary.failed_this_run == 2
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all(t.user_attrs["error"] == "RuntimeError: scorer broke on this one"
                                    for t in failed)
    assert all(t.value == 1.0 for t in trials if t.state == TrialState.COMPLETE)

    # wrong returns: one line each (told as the candidate's error, as above)
    model, tokenizer = load_causal_lm(zoo / "base")
    result = EvalResult(tasks=(), n_samples=0, wall_time_s=0.0)
    for objective, expected in {
        "scorers_t15:wrong": "objective scorers_t15:wrong returned str 'high'; return a float or a "
                             "dict of str -> float",
        "scorers_t15:several": "objective scorers_t15:several returned a dict (mean, vocab); name one "
                               "entry, e.g. scorers_t15:several[mean]",
        "scorers_t15:several[size]": "objective scorers_t15:several[size]: the function returned no "
                                     "entry 'size' (it returned mean, vocab)",
    }.items():
        space = parse_space(space_dict(zoo, objectives=[objective]))
        with pytest.raises(EvomergeError) as err:
            objective_values(space, result, model, tokenizer)
        assert str(err.value) == expected


def test_tokens_generated_counts_what_the_model_generated(zoo, tmp_path):
    model, tokenizer = load_causal_lm(zoo / "base")
    cfg = EvalConfig(tasks=["smoke_gen"], limit=3, batch_size=4)
    with make_evaluator(cfg) as inner:
        result = TokenCountingEvaluator(inner).evaluate(model, tokenizer)
    assert "generate" not in vars(model)  # the counter is gone after the evaluation
    # smoke_gen generates at most 8 tokens per doc: 3 docs, each at least one token
    assert 3 <= result.extra["tokens_generated"] <= 3 * 8
    # the count equals what generate returned: re-run the same greedy generation by hand
    with GenerationCounter(model) as counter:
        ids = tokenizer(["a b", "c"], return_tensors="pt", padding=True)
        out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                             max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, ids["input_ids"].shape[1]:]
    assert counter.tokens == int((new != tokenizer.pad_token_id).sum()) > 0

    space = parse_space(space_dict(zoo, objectives=["score", "tokens_generated"], sampler="random",
                                   eval={"tasks": ["smoke_gen", "smoke_mc"], "limit": 3, "batch_size": 4}))
    run_search(space, RunOptions(out_dir=tmp_path / "gen", trials=2))
    trials = optuna.load_study(study_name="o", storage=default_storage(tmp_path / "gen")).get_trials()
    assert all(t.state == TrialState.COMPLETE and 3 <= t.values[1] <= 24 for t in trials)
    # multiple choice alone generates nothing
    with make_evaluator(EvalConfig(tasks=["smoke_mc"], limit=3)) as inner:
        assert TokenCountingEvaluator(inner).evaluate(model, tokenizer).extra["tokens_generated"] == 0
    assert torch.is_grad_enabled()
