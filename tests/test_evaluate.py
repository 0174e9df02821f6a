"""Evaluation: config, validation before any model load, and real lm-eval runs on tiny models.

Tasks are the local smoke tasks in eval_tasks/smoke/ (a loglikelihood multiple-choice task and a
greedy generate_until exact-match task); models come from tests/fixtures.py.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from fixtures import make_tiny_llama, use_hf_home

from evomerge.evaluate import (
    EvalConfig,
    EvalConfigError,
    EvalResult,
    TaskCatalog,
    TaskScore,
    TaskSpec,
    evaluate_model_dir,
    format_table,
    load_preset,
    validate_eval_config,
    weighted_score,
)
from evomerge.evaluate.tasks.config import REPO_EVAL_TASKS

SMOKE = ("smoke_mc", "smoke_gen")
# hidden 256 / 4 heads: head_dim 64, which vLLM's CPU attention accepts (shared with the vllm tests)
TINY = {"hidden": 256, "heads": 4, "intermediate": 512}


@pytest.fixture(autouse=True)
def _isolated_hf_cache(monkeypatch, tmp_path_factory):
    """lm-eval caches datasets under HF_HOME; keep that in a temp dir. One torch thread: on a
    shared 2-core machine two threads are several times slower under contention."""
    use_hf_home(monkeypatch, tmp_path_factory.getbasetemp() / "hf_home")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_catalog() -> TaskCatalog:
    return TaskCatalog([REPO_EVAL_TASKS])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return make_tiny_llama(root / "a", seed=0, **TINY), make_tiny_llama(root / "b", seed=1, **TINY)


def load(path: Path):
    from evomerge.candidate import load_causal_lm

    return load_causal_lm(path)


def scripted_lm(correct: bool = True):
    """An lm-eval LM that answers the smoke tasks from their data (right, or always wrong):
    exercises request building, filters and metrics without depending on model weights."""
    from lm_eval.api.model import LM

    rows = [json.loads(line) for line in (REPO_EVAL_TASKS / "smoke/smoke_mc.jsonl").open()]
    answers = {r["question"]: r["choices"][r["label"]] for r in rows}

    class ScriptedLM(LM):
        def loglikelihood(self, requests):
            out = []
            for req in requests:
                context, continuation = req.args
                question = context.rsplit("Question: ", 1)[-1].split("\n")[0]
                right = continuation.strip() == answers.get(question)
                out.append((0.0 if right == correct else -5.0, right == correct))
            return out

        def loglikelihood_rolling(self, requests):
            return [0.0 for _ in requests]

        def generate_until(self, requests):
            words = [req.args[0].rsplit("Word: ", 1)[-1].split("\n")[0] for req in requests]
            return [f" {w}" if correct else " nothing" for w in words]

    return ScriptedLM()


# ---------------------------------------------------------------------------- config
def test_short_forms_and_defaults():
    cfg = EvalConfig(tasks="smoke_mc, smoke_gen:-0.5")
    assert cfg.tasks == (TaskSpec(name="smoke_mc"), TaskSpec(name="smoke_gen", weight=-0.5))
    assert cfg.backend == "hf" and cfg.limit is None and cfg.seed == 0
    cfg = EvalConfig(tasks=["smoke_mc:2", {"name": "smoke_gen", "metric": "exact_match"}])
    assert cfg.tasks[0].weight == 2.0 and cfg.tasks[1].metric == "exact_match"
    with pytest.raises(Exception):
        cfg.limit = 3  # frozen


def test_config_reports_all_problems_together():
    with pytest.raises(ValueError) as err:
        EvalConfig(tasks="a,a", limit=1.5, lm_eval_args={"bogus": 1})
    msg = str(err.value)
    assert "more than once" in msg and "fraction" in msg and "bogus" in msg
    with pytest.raises(ValueError, match="name:weight"):
        TaskSpec.model_validate("smoke_mc:heavy")
    with pytest.raises(ValueError, match="non-zero"):
        TaskSpec(name="smoke_mc", weight=0)


def test_backend_registry_is_the_one_list_of_backend_names():
    from evomerge.evaluate import BACKENDS, backend, make_evaluator

    assert set(BACKENDS) == {"hf", "vllm"} and backend("hf").scores_resident_model
    with pytest.raises(ValueError, match="unknown eval backend 'tgi'; known backends: hf, vllm"):
        EvalConfig(tasks="smoke_mc", backend="tgi")
    with pytest.raises(ValueError, match="known backends"):
        make_evaluator(EvalConfig.model_construct(backend="tgi"))


def test_lm_eval_outside_the_tested_range_fails_with_one_line():
    from evomerge.adapters.lm_eval import SUPPORTED, UnsupportedVersionError, check_version

    check_version(SUPPORTED[0])
    for installed in ("0.4.8", SUPPORTED[1], "0.5.0", None):
        with pytest.raises(UnsupportedVersionError) as err:
            check_version(installed)
        msg = str(err.value)
        assert "\n" not in msg and f"pip install 'lm-eval[hf]>={SUPPORTED[0]},<{SUPPORTED[1]}'" in msg
        assert (f"lm-eval {installed} is installed" if installed else "not installed") in msg


def test_weighted_score_with_negative_weight():
    scores = (
        TaskScore("acc_task", "acc,none", 0.6, weight=2.0),
        TaskScore("ppl_task", "word_perplexity,none", 10.0, weight=-0.5),
        TaskScore("em_task", "exact_match,none", 0.2, weight=1.5),
    )
    expected = (2.0 * 0.6 - 0.5 * 10.0 + 1.5 * 0.2) / (2.0 + 0.5 + 1.5)
    assert weighted_score(scores) == pytest.approx(expected)
    result = EvalResult(scores, n_samples=30, wall_time_s=1.0)
    assert result.score == pytest.approx(expected)
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    table = format_table(result)
    assert "ppl_task" in table and "-0.5" in table and f"{expected:.4f}" in table


def test_presets_load_and_name_real_lm_eval_tasks():
    medical, board = load_preset("medical"), load_preset("leaderboard", limit=50)
    assert len(medical.tasks) == 9 and board.limit == 50
    assert {t.name for t in board.tasks} >= {"arc_challenge", "mmlu", "gsm8k"}
    with pytest.raises(EvalConfigError, match="available presets"):
        load_preset("nope")


@pytest.mark.slow
def test_presets_validate_against_lm_eval_builtin_tasks():
    # Indexes lm-eval's ~12k built-in YAMLs once (~16-30 s).
    catalog = TaskCatalog([REPO_EVAL_TASKS], include_defaults=True)
    for name in ("medical", "leaderboard"):
        assert validate_eval_config(load_preset(name), catalog) == []


# ---------------------------------------------------------------------------- validation
def test_validation_finds_every_problem_before_loading(local_catalog, tmp_path):
    cfg = EvalConfig(
        tasks=["smoke_mcc", {"name": "smoke_gen", "metric": "acc"}, "smoke_mc_group", "smoke_mc"],
        include_paths=(str(tmp_path / "missing"),),
    )
    problems = validate_eval_config(cfg, local_catalog)
    assert len(problems) == 4, problems
    assert "include path" in problems[0] and "missing" in problems[0]
    assert "unknown eval task 'smoke_mcc'" in problems[1] and "smoke_mc" in problems[1]
    assert "does not report metric 'acc'" in problems[2] and "exact_match,strip" in problems[2]
    assert "part of both" in problems[3]
    assert validate_eval_config(EvalConfig(tasks=SMOKE), local_catalog) == []


def test_metric_resolution(local_catalog):
    from evomerge.evaluate.tasks.validate import resolve_metric

    assert resolve_metric(TaskSpec(name="smoke_mc"), local_catalog) == "acc,none"
    assert resolve_metric(TaskSpec(name="smoke_mc", metric="acc_norm"), local_catalog) == "acc_norm,none"
    assert resolve_metric(TaskSpec(name="smoke_gen"), local_catalog) == "exact_match,strip"
    assert resolve_metric(TaskSpec(name="smoke_mc_group"), local_catalog) == "acc,none"
    # A group aggregate without filter_list reports under its members' filters.
    assert resolve_metric(TaskSpec(name="smoke_gen_group"), local_catalog) == "exact_match,strip"
    assert local_catalog.leaf_names("smoke_mc_group") == {"smoke_mc", "smoke_mc_bare"}


def test_bad_config_fails_before_the_model_is_read(monkeypatch, tmp_path):
    import evomerge.evaluate.hf as hf

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(hf, "load_causal_lm", must_not_load)
    # (An unknown name is covered above with the local catalog: proving a name unknown here
    # means indexing lm-eval's built-in tasks, ~16 s.)
    for cfg, fragment in [
        (EvalConfig(tasks=SMOKE, include_paths=(str(tmp_path / "nope"),)), "does not exist"),
        (EvalConfig(tasks=[{"name": "smoke_mc", "metric": "f1"}]), "does not report metric 'f1'"),
    ]:
        with pytest.raises(EvalConfigError, match=fragment):
            evaluate_model_dir(tmp_path / "no-model-here", cfg)


# ---------------------------------------------------------------------------- real runs
def test_in_memory_update_equals_loading_from_disk(model_dirs):
    from evomerge.evaluate.hf import HFEvaluator

    dir_a, dir_b = model_dirs
    cfg = EvalConfig(tasks=SMOKE, batch_size=4)
    with HFEvaluator(cfg) as evaluator:
        model, tok = load(dir_a)
        before = evaluator.evaluate(model, tok)
        state_b = load(dir_b)[0].state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(state_b[name])  # in place: same module, same parameters
        in_memory = evaluator.evaluate(model, tok)
        from_disk = evaluator.evaluate(dir_b)
    assert [t.value for t in in_memory.tasks] == [t.value for t in from_disk.tasks]
    assert in_memory.score == from_disk.score
    assert in_memory.n_samples == from_disk.n_samples == 48
    # The wrapper was reused, yet it saw the new weights (A and B differ on these tasks).
    assert [t.value for t in before.tasks] != [t.value for t in in_memory.tasks]
    for t in in_memory.tasks:
        assert 0.0 <= t.value <= 1.0 and t.n_samples == 24


def test_both_task_types_score_right_and_wrong_answers_from_any_cwd(monkeypatch, tmp_path):
    from evomerge.evaluate.tasks.runner import TaskRunner

    monkeypatch.chdir(tmp_path)  # data_files in the smoke YAMLs are relative to the YAMLs
    runner = TaskRunner(EvalConfig(tasks=["smoke_mc:1", "smoke_gen_group:3", "smoke_mc_bare:-1"]))
    right, wrong = runner.run(scripted_lm(True)), runner.run(scripted_lm(False))
    assert [t.value for t in right.tasks] == [1.0, 1.0, 1.0]
    assert [t.value for t in wrong.tasks] == [0.0, 0.0, 0.0]
    assert right.score == pytest.approx((1 + 3 - 1) / 5)  # negative weight: a penalty
    assert right.tasks[1].metric == "exact_match,strip" and right.n_samples == 72


def test_seeded_subset_is_stable_and_seed_dependent(model_dirs):
    from evomerge.evaluate.tasks.runner import TaskRunner

    cfg = EvalConfig(tasks=["smoke_mc_group", "smoke_gen"], limit=5, seed=3)
    first, again = TaskRunner(cfg), TaskRunner(cfg)
    other = TaskRunner(cfg.model_copy(update={"seed": 4}))
    assert first.samples == again.samples
    assert set(first.samples) == {"smoke_mc", "smoke_mc_bare", "smoke_gen"}
    assert all(len(ix) == 5 and ix == sorted(ix) for ix in first.samples.values())
    assert first.samples != other.samples
    assert first.samples["smoke_mc"] != list(range(5))  # not lm-eval's "first N"
    frac = TaskRunner(cfg.model_copy(update={"limit": 0.25}))
    assert all(len(ix) == 6 for ix in frac.samples.values())

    model, tok = load(model_dirs[0])
    from evomerge.evaluate.hf import HFEvaluator

    with HFEvaluator(cfg) as evaluator:
        r1 = evaluator.evaluate(model, tok)
        r2 = evaluator.evaluate(model, tok)
    assert r1.n_samples == 15 and r1.tasks == r2.tasks
    assert [t.n_samples for t in r1.tasks] == [10, 5]


def test_evaluate_model_dir_writes_json(model_dirs, tmp_path):
    out = tmp_path / "res" / "r.json"
    result = evaluate_model_dir(model_dirs[1], EvalConfig(tasks=["smoke_mc"], limit=6), out_json=out)
    data = json.loads(out.read_text())
    assert data["model"] == str(model_dirs[1]) and data["config"]["limit"] == 6
    assert math.isclose(data["score"], result.score) and data["n_samples"] == 6


def test_cli_eval_and_validate_only(model_dirs, tmp_path, capsys):
    import argparse

    from evomerge.cli.eval import cmd_eval as run_eval_command, register as add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.json"
    args = parser.parse_args(
        ["eval", str(model_dirs[0]), "--tasks", "smoke_mc:2,smoke_gen", "--limit", "4", "--out", str(out)]
    )
    assert run_eval_command(args) == 0
    printed = capsys.readouterr().out
    assert "smoke_mc" in printed and "weighted score" in printed and out.is_file()

    args = parser.parse_args(
        ["eval", str(tmp_path), "--tasks", "smoke_mc", "--include-path", str(tmp_path / "x"), "--validate-only"]
    )
    assert run_eval_command(args) == 1  # problems found, as `evomerge validate` reports them
    assert "does not exist" in capsys.readouterr().err
    with tempfile.TemporaryDirectory() as empty:
        args = parser.parse_args(["eval", empty, "--tasks", "smoke_mc", "--limit", "2"])
        assert run_eval_command(args) == 2
        assert "no config.json" in capsys.readouterr().err


def test_batched_loglikelihood_equals_lm_evals_hflm(model_dirs):
    """Our batched scoring and remembered encodings give lm-eval's HFLM answers, float for float:
    one- and multi-token continuations, shared contexts (lm-eval's one-token grouping), an
    empty context, a context longer than the model, batches of several sizes, repeated calls."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evomerge.adapters.lm_eval import resident_hflm_class

    model, tok = load(model_dirs[0])
    words = ["1", "2", "3", "12", "21", "abc", "x y", "hello there"]
    pairs = [(f"Q: {a} + {b} =", f" {c}") for a in words[:4] for b in words[:3] for c in words]
    pairs += [("", " hello"), ("1 2 3 " * 200, " 4"), ("same context", " a"), ("same context", " a")]
    # continuations the model itself predicts greedily, so that exact-match flags are not all False
    for context in ("Q: 1 + 2 =", "abc", "hello there"):
        ids = tok(context, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(3):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        cont = tok.decode(ids[0, -3:])
        pairs += [(context, cont), (context, cont[:1])]
    requests = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(pairs)]
    for batch_size in (1, 7, 64):
        want = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size).loglikelihood(requests)
        ours = resident_hflm_class()(pretrained=model, tokenizer=tok, batch_size=batch_size)
        for _ in range(2):  # the second call answers from remembered encodings
            got = ours.loglikelihood(requests)
            assert got == want, batch_size
    assert any(greedy for _, greedy in want) and not all(greedy for _, greedy in want)


# ---------------------------------------------------------------------------- hub ids, offline
def test_eval_of_an_uncached_hub_id_is_one_line_and_fast(capsys):
    """Offline (HF_HUB_OFFLINE=1, as in every test): a hub id not in the cache is one line
    naming the model and the fix, before any dataset is read."""
    import time

    from evomerge.cli import main

    start = time.perf_counter()
    code = main(["eval", "evomerge-tests/no-such-model", "--tasks", "smoke_mc", "--limit", "2"])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith("evomerge eval: error: ") and "evomerge-tests/no-such-model" in err and "hf download evomerge-tests/no-such-model" in err
    assert "HF_HUB_OFFLINE" in err
    assert seconds < 5, seconds


def test_eval_accepts_a_hub_id_from_the_cache(model_dirs, tmp_path, monkeypatch):
    """A hub id found in the hub cache (laid out as `hf download` leaves it) is scored."""
    import shutil

    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--evomerge-tests--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(model_dirs[0], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = EvalConfig(tasks=["smoke_mc"], limit=4)
    by_id = evaluate_model_dir("evomerge-tests/tiny", cfg)
    assert by_id.tasks == evaluate_model_dir(model_dirs[0], cfg).tasks


def _hub_dataset_task(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "hub_mc.yaml").write_text(
        (REPO_EVAL_TASKS / "smoke" / "smoke_mc.yaml").read_text()
        .replace("task: smoke_mc", "task: hub_mc")
        .replace("dataset_path: json", "dataset_path: evomerge-tests/uncached-dataset")
        .replace("dataset_kwargs:\n  data_files:\n    test: smoke_mc.jsonl\n", ""))
    return folder


def test_uncached_hub_dataset_is_one_line_naming_it(model_dirs, tmp_path):
    cfg = EvalConfig(tasks=["hub_mc"], include_paths=(str(_hub_dataset_task(tmp_path / "t")),))
    with pytest.raises(EvalConfigError) as err:
        evaluate_model_dir(model_dirs[0], cfg)
    assert len(err.value.problems) == 1
    text = err.value.problems[0]
    assert "dataset evomerge-tests/uncached-dataset of task(s) hub_mc" in text
    assert "HF_HUB_OFFLINE is set" in text and "then set HF_HUB_OFFLINE=1" in text


def test_unreachable_hub_answers_from_the_cache_at_once(model_dirs, tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE and no network (this machine): a short probe, then the cache alone,
    instead of the hub client's retries (~25 s)."""
    import time

    import datasets.config
    import huggingface_hub.constants as hub

    from merge_engine.io.resolve import hub_reachable

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    if hub_reachable():
        pytest.skip("the hub is reachable from here")
    cfg = EvalConfig(tasks=["hub_mc"], include_paths=(str(_hub_dataset_task(tmp_path / "t")),))
    start = time.perf_counter()
    with pytest.raises(EvalConfigError, match="the hub is unreachable; run this command once"):
        evaluate_model_dir(model_dirs[0], cfg)
    assert time.perf_counter() - start < 8
    assert hub.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored
    with pytest.raises(Exception, match="could not reach the hub .* evomerge-tests/none"):
        evaluate_model_dir("evomerge-tests/none", EvalConfig(tasks=["smoke_mc"]))


def test_task_code_behind_function_needs_an_opt_in(tmp_path, model_dirs):
    """A local task whose YAML names Python code with !function is refused before anything runs
    (lm-eval would import that code when building the task); with allow_task_code it runs."""
    import shutil

    from evomerge.evaluate.api import evaluate_model_dir

    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(REPO_EVAL_TASKS / "smoke" / "smoke_mc.jsonl", folder)
    text = (REPO_EVAL_TASKS / "smoke" / "smoke_mc.yaml").read_text()
    ran = tmp_path / "code_ran"
    (folder / "coded.yaml").write_text(text.replace("task: smoke_mc", "task: smoke_mc_coded").replace(
        'doc_to_text: "Question: {{question}}\\nAnswer:"', "doc_to_text: !function helpers.prompt"))
    (folder / "helpers.py").write_text(  # touches the marker when imported, not only when called
        f"from pathlib import Path\n\nPath({str(ran)!r}).touch()\n\n\ndef prompt(doc):\n"
        "    return 'Question: ' + doc['question'] + '\\nAnswer:'\n")
    # a task that gets the code through `include:` needs the opt-in too
    (folder / "child.yaml").write_text("include: coded.yaml\ntask: smoke_mc_child\n")
    child = validate_eval_config(EvalConfig(tasks="smoke_mc_child", include_paths=[str(folder)]))
    assert len(child) == 1 and "smoke_mc_child" in child[0] and "allow_task_code" in child[0]
    cfg = EvalConfig(tasks="smoke_mc_coded", include_paths=[str(folder)], limit=2)
    problems = validate_eval_config(cfg)
    assert len(problems) == 1 and "smoke_mc_coded" in problems[0] and "allow_task_code" in problems[0]
    assert "coded.yaml" in problems[0] and not ran.exists()
    with pytest.raises(EvalConfigError, match="allow_task_code"):
        evaluate_model_dir(model_dirs[0], cfg, device="cpu")
    assert not ran.exists()
    trusted = cfg.model_copy(update={"allow_task_code": True})
    assert validate_eval_config(trusted) == []
    assert evaluate_model_dir(model_dirs[0], trusted, device="cpu").tasks[0].task == "smoke_mc_coded"
    assert ran.exists()  # the code ran, once opted in
