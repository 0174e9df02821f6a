"""Ablation grids: every cell equals `evomerge merge` + `evomerge eval` of that row alone, runs
resume where they stopped, and the shipped medical grid validates from its bundled configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fixtures import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
MEDICAL = REPO / "ablations" / "medical" / "grid.yaml"

GRID = """\
# Run: evomerge ablate grid.yaml --var M=<models dir>
name: tiny
parents:
  - {name: a, model: "${M}/a"}
  - {name: b, model: "${M}/b"}
  - {name: base, model: "${M}/base", evaluate: false}
eval:
  - {name: mc, tasks: [smoke_mc], batch_size: 4}
  - {name: gen, tasks: [smoke_gen], limit: 3}
recipes:
  - name: lerp
    recipe: {merge_method: linear, models: [{model: a, parameters: {weight: 0.5}},
                                            {model: b, parameters: {weight: 0.5}}]}
  - name: slerp
    recipe: {merge_method: slerp, base_model: a, models: [{model: a}, {model: b}],
             parameters: {t: [0.2, 0.8]}}
  - name: ties
    recipe: {merge_method: ties, base_model: base, dtype: bfloat16,
             models: [{model: a, parameters: {weight: 0.5, density: 0.5}},
                      {model: b, parameters: {weight: 0.5, density: 0.5}}]}
  - name: dare_ties
    recipe: {merge_method: dare_ties, base_model: base, seed: 7,
             models: [{model: a, parameters: {weight: 0.6, density: 0.4}},
                      {model: b, parameters: {weight: 0.6, density: 0.4}}]}
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and much faster than on two on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_llama(root / "base", seed=0)
    make_tiny_llama(root / "a", seed=1, perturb_from=base, scale=0.05)
    make_tiny_llama(root / "b", seed=2, perturb_from=base, scale=0.05)
    return root


@pytest.fixture(scope="module")
def grid(models, tmp_path_factory):
    from evomerge.ablate import load_grid

    path = tmp_path_factory.mktemp("grid") / "grid.yaml"
    path.write_text(GRID)
    return load_grid(path, {"M": str(models)})


@pytest.fixture(scope="module")
def evaluators(grid):
    """Built once (lm-eval tasks are costly to build) and shared by the runs below."""
    from evomerge.evaluate import make_evaluator

    evs = {es.name: make_evaluator(es.config) for es in grid.evals}
    yield evs
    for ev in evs.values():
        ev.close()


@pytest.fixture(scope="module")
def first_run(grid, evaluators, tmp_path_factory):
    from evomerge.ablate import run_grid

    out = tmp_path_factory.mktemp("run")
    return run_grid(grid, out, evaluators=evaluators)


class Fake:
    """A stand-in evaluator (no lm-eval): a score derived from the model, for bookkeeping tests."""

    def __init__(self, task: str) -> None:
        self.task = task

    def evaluate(self, model, tokenizer=None):
        from evomerge.evaluate.result import EvalResult, TaskScore

        if isinstance(model, (str, Path)):
            value = len(str(model)) / 1000
        else:
            value = float(next(model.parameters()).detach().float().abs().mean())
        return EvalResult(tasks=(TaskScore(self.task, "acc,none", value, 1.0),), n_samples=1,
                          wall_time_s=0.0)

    def close(self) -> None:
        pass


def fakes() -> dict[str, Fake]:
    return {"mc": Fake("smoke_mc"), "gen": Fake("smoke_gen")}


class Counting:
    """An evaluator wrapper that counts calls and can fail the n-th one (a simulated crash)."""

    def __init__(self, inner, crash_at: int | None = None) -> None:
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def evaluate(self, model, tokenizer=None):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt
        return self.inner.evaluate(model, tokenizer)

    def close(self) -> None:
        pass


def test_every_cell_equals_merge_then_eval(grid, first_run, models):
    """Each row re-run alone via the library calls behind `evomerge merge` / `evomerge eval`."""
    from evomerge.cli import main
    from evomerge.evaluate.api import evaluate_model_dir
    from evomerge.evaluate import make_evaluator
    from evomerge.evaluate.result import EvalResult
    from evomerge.evaluate.tasks.config import load_preset
    from merge_engine.merge import run_merge
    from merge_engine.recipe import load_recipe

    out = first_run.out_dir
    configs = {es.name: load_preset(str(out / "eval" / f"{es.name}.yaml")) for es in grid.evals}
    assert configs == {es.name: es.config for es in grid.evals}
    # evaluate_model_dir (what `evomerge eval` calls) builds its tasks on every call; build them
    # once per eval set and call the same evaluate(model_dir) it does.
    alone = {name: make_evaluator(cfg) for name, cfg in configs.items()}
    assert first_run.evaluated == ["a", "b", "lerp", "slerp", "ties", "dare_ties"]
    assert not first_run.failed
    table = {r["model"]: r for r in _csv(out / "table.csv")}
    assert list(table) == first_run.evaluated
    modes = {}
    for name in first_run.evaluated:
        record = json.loads((out / "rows" / f"{name}.json").read_text())
        modes[name] = record["mode"]
        model_dir = Path(record["model"]) if record["kind"] == "parent" else out.parent / f"{out.name}-{name}"
        if name == "ties":  # the literal commands the row records, run in-process
            merge_cmd, *eval_cmds = record["reproduce"]
            assert main(merge_cmd.split()[1:-1] + [str(model_dir)]) == 0
            for es, cmd in zip(grid.evals, eval_cmds):
                args = cmd.split()[1:]
                args[1] = str(model_dir)
                assert main(args + ["--out", str(model_dir / f"{es.name}.json")]) == 0
            results = {es.name: EvalResult.from_dict(json.loads((model_dir / f"{es.name}.json").read_text()))
                       for es in grid.evals}
        else:
            if record["kind"] == "merge":
                run_merge(load_recipe(out / record["recipe_file"]), model_dir, device="cpu")
            results = {es.name: (evaluate_model_dir(model_dir, configs[es.name]) if name == "a"
                                 else alone[es.name].evaluate(model_dir)) for es in grid.evals}
        for es in grid.evals:
            cells = {t["task"]: t["value"] for t in record["evals"][es.name]["tasks"]}
            for t in results[es.name].tasks:
                assert cells[t.task] == t.value, (name, t.task)
                assert float(table[name][t.task]) == pytest.approx(t.value, abs=1e-6)
    assert modes == {"a": "load", "b": "load", "lerp": "in-memory", "slerp": "in-memory",
                     "ties": "in-memory", "dare_ties": "in-memory"}
    # The merges differ from each other: equal cells are not an accident of identical models.
    assert len({table[n]["avg"] for n in table}) > 2 or len({table[n]["smoke_mc"] for n in table}) > 1
    md = (out / "table.md").read_text()
    assert "| lerp |" in md and "a *(parent)*" in md and (out / "table.png").stat().st_size > 1000


def test_resume_scores_only_missing_rows(grid, first_run, evaluators):
    from evomerge.ablate import run_grid

    out = first_run.out_dir
    before = (out / "rows" / "lerp.json").read_text()
    (out / "rows" / "ties.json").unlink()
    counting = {k: Counting(v) for k, v in evaluators.items()}
    run = run_grid(grid, out, evaluators=counting)
    assert run.evaluated == ["ties"]
    assert sorted(run.skipped) == ["a", "b", "dare_ties", "lerp", "slerp"]
    assert {k: c.calls for k, c in counting.items()} == {"mc": 1, "gen": 1}
    assert (out / "rows" / "lerp.json").read_text() == before


def test_crash_mid_grid_then_resume(grid, tmp_path):
    from evomerge.ablate import run_grid

    evaluators = fakes()
    crashing = {"mc": Counting(evaluators["mc"], crash_at=4), "gen": Counting(evaluators["gen"])}
    with pytest.raises(KeyboardInterrupt):  # dies while scoring the 4th row (slerp)
        run_grid(grid, tmp_path, evaluators=crashing)
    done = sorted(p.stem for p in (tmp_path / "rows").glob("*.json"))
    assert done == ["a", "b", "lerp"]
    assert not list((tmp_path / "rows").glob(".*tmp"))  # no half-written row
    counting = {k: Counting(v) for k, v in evaluators.items()}
    run = run_grid(grid, tmp_path, evaluators=counting)
    assert run.evaluated == ["slerp", "ties", "dare_ties"]
    assert counting["mc"].calls == 3
    assert len(_csv(tmp_path / "table.csv")) == 6


def test_changed_recipe_or_eval_setting_rescores_what_it_affects(grid, tmp_path):
    from evomerge.ablate import run_grid

    assert run_grid(grid, tmp_path, evaluators=fakes()).evaluated == [r.name for r in grid.rows()]
    changed = grid.recipes[0].recipe.model_copy(update={"seed": 99})
    grid2 = grid.model_copy(update={"recipes": (grid.recipes[0].model_copy(update={"recipe": changed}),
                                                *grid.recipes[1:])})
    assert run_grid(grid2, tmp_path, evaluators=fakes()).evaluated == ["lerp"]
    limited = grid2.with_limit(3)
    assert all(limited.fingerprint(r) != grid2.fingerprint(r) for r in grid2.rows())


def test_grid_problems_are_reported_together(models, tmp_path):
    from evomerge.ablate import GridError, load_grid

    bad = yaml.safe_load(GRID)
    bad["recipes"].append({"name": "lerp", "recipe": {"merge_method": "linaer", "models": ["a"]}})
    bad["recipes"].append({"name": "x", "recipe": {"merge_method": "ties", "models": ["a"], "dtyp": 1}})
    bad["eval"].append({"name": "dup", "tasks": ["smoke_mc"]})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(GridError) as err:
        load_grid(path, {"M": str(models)})
    text = str(err.value)
    assert "used twice" in text and "dtyp" in text and "smoke_mc" in text
    with pytest.raises(GridError, match=r"\$\{M\} is not set"):
        load_grid(tmp_path / "bad.yaml", {})


def test_config_only_reader_matches_checkpoint(models, tmp_path):
    from merge_engine.io.config_only import ConfigOnlyReader
    from merge_engine.io.reader import CheckpointReader

    tied = make_tiny_llama(tmp_path / "tied", seed=3, tie=True, dtype=__import__("torch").bfloat16)
    for path in (models / "a", tied):
        with CheckpointReader(path) as real:
            meta = ConfigOnlyReader(path)
            assert meta.tensor_names == real.tensor_names
            for n in real.tensor_names:
                assert (meta.shape(n), meta.dtype(n)) == (tuple(real.shape(n)), real.dtype(n))


def test_medical_grid_validates_from_bundled_configs(capsys):
    from evomerge.ablate import load_grid, validate_grid
    from evomerge.cli import main

    grid = load_grid(MEDICAL)
    assert {r.recipe.merge_method for r in grid.recipes} >= {"linear", "slerp", "ties", "dare_ties"}
    report = validate_grid(grid, config_only=True, check_tasks=False)
    assert report.problems == []
    # Meditron's 32017-row vocabulary (bundled config) is cut to Llama-2's 32000 rows.
    assert any("32000" in w for w in report.warnings)
    # The command itself. Task names are left out: indexing lm-eval's ~12k task YAMLs takes 16 s
    # to minutes on a busy machine, and the presets' task names are the evaluator's tests' business.
    assert main(["ablate", str(MEDICAL), "--validate-only", "--no-task-check"]) == 0
    assert "ok" in capsys.readouterr().out


def test_config_only_validation_finds_shape_problems(tmp_path):
    from merge_engine.session import validate
    from merge_engine.recipe import parse_recipe

    cfg = json.loads((MEDICAL.parent / "configs/meta-llama/Llama-2-7b-hf/config.json").read_text())
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 12000}))
    recipe = parse_recipe({"merge_method": "ties", "base_model": "meta-llama/Llama-2-7b-hf",
                           "models": [{"model": "org/wide", "parameters": {"weight": 1.0}},
                                      {"model": "org/missing", "parameters": {"weight": 1.0}}]})
    configs = {"meta-llama/Llama-2-7b-hf": MEDICAL.parent / "configs/meta-llama/Llama-2-7b-hf",
               "org/wide": tmp_path / "wide"}
    report = validate(recipe, model_configs=configs)
    assert any("org/missing" in p and "model_configs" in p for p in report.problems)
    del configs  # the missing model stops before shapes; check shapes on their own
    report = validate(parse_recipe({
        "merge_method": "ties", "base_model": "meta-llama/Llama-2-7b-hf",
        "models": [{"model": "org/wide", "parameters": {"weight": 1.0}}]}),
        model_configs={"meta-llama/Llama-2-7b-hf": MEDICAL.parent / "configs/meta-llama/Llama-2-7b-hf",
         "org/wide": tmp_path / "wide"})
    assert any("mlp" in p and "12000" in p for p in report.problems), report.problems


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_medical_search_space_makes_valid_recipes():
    """The search beyond the grid: every recipe it proposes validates from the bundled configs."""
    import optuna
    from optuna.trial import FixedTrial

    from evomerge.ablate import load_grid
    from evomerge.space import distributions, load_space, start_points, trial_recipe
    from merge_engine.session import validate
    from merge_engine.recipe import load_recipe

    grid = load_grid(MEDICAL)
    space = load_space(MEDICAL.parent / "search_space.yaml")
    assert len(distributions(space)) == 32 and "layer_31.meditron.density" in distributions(space)
    # The search starts from the grid's dare_ties row, kept in one file and inline in the grid.
    start_file = load_recipe(MEDICAL.parent / "recipes" / "dare_ties.yaml")
    assert start_file.to_dict() == next(r.recipe for r in grid.recipes if r.name == "dare_ties").to_dict()
    trials = [FixedTrial(params) for _, params in start_points(space)]
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    trials.append(study.ask(distributions(space)))
    readers: dict = {}
    for trial in trials:
        recipe = trial_recipe(space, trial)
        report = validate(recipe, model_configs=grid.model_configs, opened=readers)
        assert report.problems == [], report.problems
    assert isinstance(recipe.models[1].parameters["density"], list)  # per-layer values


def test_zoo_grid_matches_the_zoo_and_the_medical_grid(tmp_path):
    """The zoo grid names real zoo experts and tasks, and runs the medical grid's recipes."""
    from evomerge.ablate import load_grid
    from evomerge.evaluate.tasks.config import REPO_EVAL_TASKS
    from evomerge.zoo import RECIPES, expert_name

    zoo = load_grid(REPO / "ablations" / "zoo_grid.yaml", {"ZOO": str(tmp_path)})
    folders = {Path(p.model).name for p in zoo.parents}
    assert folders <= {"base"} | {expert_name(s) for s in RECIPES["demo"].skills}
    for es in zoo.evals:
        for t in es.config.tasks:
            assert (REPO_EVAL_TASKS / "zoo" / f"{t.name}.yaml").is_file(), t.name
    medical = load_grid(MEDICAL)

    def shape(recipe) -> dict:  # the recipe without model names and dtype
        d = recipe.to_dict()
        d.pop("dtype", None)
        for m in d.get("models", []):
            m.pop("model")
        d.pop("base_model", None)
        return d

    assert [(r.name, shape(r.recipe)) for r in zoo.recipes] == \
        [(r.name, shape(r.recipe)) for r in medical.recipes]


def test_parent_names_resolve_in_slice_bases_and_the_tokenizer_block(models, tmp_path):
    """A grid recipe may name parents wherever a recipe names models: per-slice base_model, the
    tokenizer block's source and its token sources (mergekit-evolve and tokenizer recipes)."""
    from evomerge.ablate import load_grid

    data = yaml.safe_load(GRID)
    data["recipes"] = [{"name": "tok", "recipe": {
        "merge_method": "ties", "base_model": "base",
        "slices": [{"base_model": "base", "sources": [
            {"model": "base", "layer_range": [0, 2]},
            {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.5}}]}],
        "tokenizer": {"source": "a", "tokens": {"<x>": {"source": "b"},
                                                "<y>": {"source": {"kind": "model_token", "model": "a", "token_id": 3}}}}}}]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_grid(path, {"M": str(models)}).recipes[0].recipe
    assert str(recipe.slices[0].base_model) == f"{models}/base"
    assert str(recipe.tokenizer.source) == f"{models}/a"
    assert str(recipe.tokenizer.tokens["<x>"].source) == f"{models}/b"
    assert str(recipe.tokenizer.tokens["<y>"].source.model) == f"{models}/a"
