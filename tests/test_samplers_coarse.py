"""The coarse-to-fine default for big per-layer spaces (evomerge.search.coarse): tied GP
proposals first, then CMA-ES over every parameter from the best tied point; on a real study with
a stand-in fitness (the samplers are under test here, not the evaluation)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from spaces import ties_per_layer_space

from evomerge.search.coarse import FINE_SIGMA, _value, CoarseToFineSampler, coarse_trials, tie_groups
from evomerge.search.samplers import default_sampler
from evomerge.search.study import enqueue_start_points, open_study
from evomerge.space import distributions, equal_params, parse_space


pytestmark = pytest.mark.usefixtures("optuna_warnings_only")


def big_space(zoo, **overrides):
    """TIES weights and densities per layer and filter, and lambda: 25 numbers, 5 when tied."""
    return parse_space(ties_per_layer_space(zoo, **{"budget": {"trials": 36}, "start": ["equal"], **overrides}))


def fitness(params: dict) -> float:
    """Best where attention weights are 0.2 and MLP weights 0.6 (so per-layer values matter)."""
    def target(name: str) -> float:
        return 0.2 if "self_attn" in name else 0.6 if "mlp" in name else 0.4
    return -sum((v - target(n)) ** 2 for n, v in params.items() if n.endswith("weight"))


def run(space, trials: int) -> optuna.Study:
    study = open_study(space, storage=optuna.storages.InMemoryStorage(), study_name="big")
    enqueue_start_points(study, space)
    for _ in range(trials):
        trial = study.ask(distributions(space))
        study.tell(trial, fitness(trial.params))
    return study


def test_tying_groups_every_layer_and_filter_copy_of_a_models_parameter(zoo):
    space = big_space(zoo)
    groups = tie_groups(space)
    assert sorted(groups) == ["code.density", "code.weight", "lambda", "math.density", "math.weight"]
    members = [m for ms in groups.values() for m in ms]
    assert sorted(members) == sorted(distributions(space)) and len(members) == 25
    assert groups["math.weight"] == [n for n in distributions(space) if n.endswith("math.weight")]
    assert default_sampler(space) == "coarse-to-fine"       # 25 parameters, 5 once tied
    assert default_sampler(big_space(zoo, layer_granularity=None, filters=[])) == "gp"
    assert coarse_trials(space, 36) == 12 and coarse_trials(space, 90) == 20 and coarse_trials(space, 9) == 10


def test_coarse_trials_are_tied_then_cmaes_refines_the_best_one(zoo):
    space = big_space(zoo)
    n_coarse = coarse_trials(space, space.budget.trials)
    study = run(space, n_coarse + 13)
    assert isinstance(study.sampler, CoarseToFineSampler)
    trials = study.get_trials()
    assert trials[0].params == equal_params(space)          # the start point first
    groups = tie_groups(space)
    for t in trials[:n_coarse]:                               # coarse: every copy equal
        assert all(len({t.params[m] for m in ms}) == 1 for ms in groups.values()), t.number
        assert not any(k.startswith("cma:") for k in t.system_attrs)
    # the GP over the tied space beats its random startup
    coarse_values = [t.value for t in trials[:n_coarse]]
    assert max(coarse_values[6:]) > max(coarse_values[:6])
    # fine: CMA-ES generations, mean at the best tied trial, a small first step
    fine = study.sampler.fine_sampler(study)
    best = max(trials[:n_coarse], key=lambda t: t.value)
    assert fine._sigma0 == FINE_SIGMA
    assert fine._x0["layers_00_00.mlp.math.weight"] == pytest.approx(best.params["layers_00_00.mlp.math.weight"])
    assert all("cma:generation" in t.system_attrs for t in trials[n_coarse:])
    assert any(len({t.params[m] for m in groups["math.weight"]}) > 1 for t in trials[n_coarse:])
    spread = [abs(t.params["layers_00_00.mlp.math.weight"] - fine._x0["layers_00_00.mlp.math.weight"])
              for t in trials[n_coarse:]]
    assert max(spread) < 4 * FINE_SIGMA


def test_the_same_study_gives_the_same_proposals_and_pruned_trials_teach_the_gp(zoo):
    space = big_space(zoo)
    first, again = run(space, 8), run(space, 8)
    assert [t.params for t in first.get_trials()] == [t.params for t in again.get_trials()]
    # a pruned trial (cheap rung score only) is fitted at its last rung's score
    rungs = big_space(zoo, fidelity={"rungs": [2]})
    study = open_study(rungs, storage=optuna.storages.InMemoryStorage(), study_name="p")
    for k in range(8):
        trial = study.ask(distributions(space))
        if k % 2:
            trial.report(fitness(trial.params), step=0)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, fitness(trial.params))
    assert study.sampler._pruning
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert [_value(t, True) for t in pruned] == [t.intermediate_values[0] for t in pruned]
    assert _value(pruned[0], False) is None
    nxt = study.ask(distributions(space))
    assert all(len({nxt.params[m] for m in ms}) == 1 for ms in tie_groups(space).values())
