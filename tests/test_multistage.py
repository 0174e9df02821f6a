"""Multi-stage recipes (mergekit-multi's format) on tiny real checkpoints: parsing errors, whole-file
merges equal to merging the stages one by one through disk (bit for bit), spilled and kept
intermediates, interruption, and the in-memory stage API a search uses."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import yaml

from fixtures import load_state, make_abc_zoo, make_lora_adapter
from merge_engine.errors import OutputExistsError, RecipeError
from merge_engine.merge import run_merge
from merge_engine.multistage import StagePipeline, run_stages
from merge_engine.stage_validate import validate_stages
from merge_engine.recipe import load_recipe, parse_recipe
from merge_engine.stages import load_stages, parse_stages, with_overrides

# files that must be byte-identical between a whole-file merge and stage-by-stage merges (the
# recipe and model card name stages instead of folders, so they differ by design)
SAME = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return make_abc_zoo(tmp_path_factory.mktemp("stagezoo"))


def three_stages(zoo) -> list[dict]:
    """first: linear(a, b) in bf16 with chatml; second: slerp(first, c) in f32 (inputs of mixed
    dtypes need a ``dtype``); final: ties over base."""
    return [
        {"name": "first", "merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
         "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.3}},
                    {"model": str(zoo["b"]), "parameters": {"weight": 0.7}}],
         "chat_template": "chatml"},
        {"name": "second", "merge_method": "slerp", "base_model": "first", "dtype": "float32",
         "models": [{"model": "first"}, {"model": str(zoo["c"])}], "parameters": {"t": [0.2, 0.8]}},
        {"merge_method": "ties", "base_model": str(zoo["base"]), "chat_template": "auto",
         "models": [{"model": "second", "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": str(zoo["a"]), "parameters": {"weight": 0.4, "density": 0.7}}]},
    ]


def write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def one_by_one(docs: list[dict], root: Path) -> Path:
    """Merge the stages as a user would without multi-stage support: each named stage into a
    folder, later stages naming that folder; returns the final output folder."""
    folders: dict[str, str] = {}
    out = None
    for doc in docs:
        text = yaml.safe_dump(doc, sort_keys=False)
        for name, folder in folders.items():
            text = text.replace(f": {name}\n", f": {folder}\n")
        recipe = parse_recipe(yaml.safe_load(text))
        out = root / (doc.get("name") or "final")
        run_merge(recipe, out, device="cpu")
        if "name" in doc:
            folders[doc["name"]] = str(out)
    return out


def assert_same_model(got: Path, want: Path) -> None:
    weights = sorted(p.name for p in want.glob("*.safetensors"))
    assert weights and sorted(p.name for p in got.glob("*.safetensors")) == weights
    for name in weights + [n for n in SAME if (want / n).exists()]:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# -- parsing ---------------------------------------------------------------------------------------


def test_load_orders_stages_and_expands_variables(zoo, tmp_path, monkeypatch):
    docs = three_stages(zoo)
    docs[2]["base_model"] = "${ZOO}/base"
    path = write(tmp_path / "multi.yaml", [docs[2], docs[1], docs[0]])  # mergekit-multi allows any order
    stages = load_stages(path, {"ZOO": str(zoo["base"].parent)})
    assert [s.name for s in stages] == ["first", "second", None]
    assert stages[1].needs == ("first",) and stages[2].needs == ("second",)
    assert str(stages[2].recipe.base_model) == str(zoo["base"])
    with pytest.raises(RecipeError, match=r"\$\{ZOO\} is not set"):
        load_stages(path)
    # one document: the plain recipe, unchanged; load_recipe refuses several documents
    single = write(tmp_path / "one.yaml", [docs[0]])
    assert [s.recipe for s in load_stages(single)] == [load_recipe(single)]
    with pytest.raises(RecipeError, match="holds 3 recipes .*multi-stage"):
        load_recipe(path)


def test_all_named_final_is_the_stage_nobody_reads(zoo):
    docs = three_stages(zoo)
    docs[2]["name"] = "last"
    assert [s.name for s in parse_stages([docs[2], docs[0], docs[1]])] == ["first", "second", "last"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d[1].update(name="first"), "name 'first' is used by several documents"),
    (lambda d: d[1].pop("name"), "several documents have no name"),
    (lambda d: d[0]["models"].append({"model": "second"}), r"cycle \(first -> second -> first\)"),
    (lambda d: d[1].update(base_model="second"), r"cycle \(second -> second\)"),
    (lambda d: d[1].update(base_model="frist"), "stage second reads model 'frist'.*did you mean stage 'first'"),
    (lambda d: d[1].update(base_model="first@main"), "stages have no revisions; drop '@main'"),
    (lambda d: d[1].update(name="../up"), "name '../up' must be letters"),
    (lambda d: d[2].update(name="last") or d[0].update(name="orphan") or d[1].update(base_model=d[1]["models"][1]["model"],
                                                                                   models=[d[1]["models"][1]]),
     "stages orphan, last are read by no other stage"),
    (lambda d: d[1].update(models=[]), "document 2: .*empty"),
])
def test_bad_stage_files_are_one_line_errors(zoo, change, message):
    docs = three_stages(zoo)
    change(docs)
    with pytest.raises(RecipeError, match=message) as info:
        parse_stages(docs)
    assert all("\n" not in p for p in info.value.problems)


# -- merging a whole file --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory) -> Path:
    """The three-stage recipe merged stage by stage through disk."""
    return one_by_one(three_stages(zoo), tmp_path_factory.mktemp("onebyone"))


def test_three_stages_in_memory_equal_stage_by_stage_on_disk(zoo, reference, tmp_path):
    out = tmp_path / "out"
    result = run_stages(parse_stages(three_stages(zoo)), out, device="cpu")
    assert result.out_dir == out.absolute()
    assert_same_model(out, reference)
    assert (out / "chat_template.jinja").is_file()  # auto: the most common among base, second, a
    recipe = (out / "evomerge_recipe.yaml").read_text()
    assert [d.get("name") for d in yaml.safe_load_all(recipe)] == ["first", "second", None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the work folder is gone


def test_intermediates_over_the_budget_spill_to_disk_with_the_same_bytes(zoo, reference, tmp_path):
    out = tmp_path / "out"
    seen = []
    run_stages(parse_stages(three_stages(zoo)), out, device="cpu", memory_budget=0,
               progress=lambda stage, done, total: seen.append(stage) if done == total else None)
    assert_same_model(out, reference)
    assert seen == ["first", "second", "final"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_kept_intermediates_are_model_folders(zoo, reference, tmp_path):
    out, keep = tmp_path / "out", tmp_path / "stages"
    run_stages(parse_stages(three_stages(zoo)), out, device="cpu", keep_dir=keep)
    assert_same_model(out, reference)
    assert sorted(p.name for p in keep.iterdir()) == ["first", "second"]
    assert_same_model(keep / "second", reference.parent / "second")
    assert "<|im_start|>" in (keep / "second" / "chat_template.jinja").read_text()  # first's chatml
    # a second run reuses what the first kept (tests/test_stage_reuse.py: reuse vs refuse)
    run_stages(parse_stages(three_stages(zoo)), tmp_path / "out2", device="cpu", keep_dir=keep)
    assert_same_model(tmp_path / "out2", reference)


def test_an_interrupted_merge_leaves_nothing_behind(zoo, tmp_path):
    out = tmp_path / "out"

    def stop(stage, done, total):
        if stage == "final" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stages(parse_stages(three_stages(zoo)), out, device="cpu", memory_budget=0, progress=stop)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(OutputExistsError):  # refused before any stage runs
        run_stages(parse_stages(three_stages(zoo)), out, device="cpu", progress=stop)


def test_adapter_on_a_stage_and_stage_as_tokenizer_source(zoo, tmp_path):
    zoo = {**zoo, "lora": make_lora_adapter(tmp_path / "lora", zoo["a"], seed=7)}
    docs = [
        {"name": "first", "merge_method": "linear", "parameters": {"weight": 0.5},
         "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]},
        {"merge_method": "linear", "tokenizer_source": "first", "parameters": {"weight": 0.5},
         "models": [{"model": f"first+{zoo['lora']}"}, {"model": str(zoo["c"])}]},
    ]
    out = tmp_path / "out"
    run_stages(parse_stages(docs), out, device="cpu")
    want = one_by_one([docs[0]], tmp_path / "disk")
    docs[1]["tokenizer_source"] = str(want)
    docs[1]["models"][0]["model"] = f"{want}+{zoo['lora']}"
    run_merge(parse_recipe(docs[1]), tmp_path / "disk" / "final", device="cpu")
    assert_same_model(out, tmp_path / "disk" / "final")


def test_unused_stage_needs_kept_intermediates(zoo, tmp_path):
    docs = three_stages(zoo) + [{"name": "extra", "merge_method": "linear", "models": [{"model": str(zoo["a"])}],
                                   "parameters": {"weight": 1.0}}]
    stages = parse_stages(docs)
    with pytest.raises(RecipeError, match="stage extra is read by no other stage"):
        run_stages(stages, tmp_path / "out", device="cpu")
    run_stages(stages, tmp_path / "out", device="cpu", keep_dir=tmp_path / "keep")
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["extra", "first", "second"]


def test_validate_names_the_stage_and_skips_what_reads_it(zoo):
    docs = three_stages(zoo)
    assert validate_stages(parse_stages(docs)).ok
    docs[0]["models"][1]["parameters"] = {"weight": 0.7, "densty": 0.5}
    docs[1]["parameters"]["t"] = 2.0
    report = validate_stages(parse_stages(docs))
    assert len(report.problems) == 1 and report.problems[0].startswith("stage first: ")
    docs[0]["models"][1]["parameters"] = {"weight": 0.7}
    report = validate_stages(parse_stages(docs))
    assert len(report.problems) == 1 and report.problems[0].startswith("stage second: ")


def test_cli_merge_and_validate_a_multi_stage_file(zoo, reference, tmp_path, capsys):
    from evomerge.cli import main

    path = write(tmp_path / "multi.yaml", three_stages(zoo))
    assert main(["validate", str(path)]) == 0
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run", "--device", "cpu"]) == 0
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "--stage-memory", "1M"]) == 0
    assert "merged 3 stages" in capsys.readouterr().out
    assert_same_model(tmp_path / "out", reference)
    bad = three_stages(zoo)
    bad[1]["base_model"] = "frist"
    assert main(["validate", str(write(tmp_path / "bad.yaml", bad))]) == 1
    assert "did you mean stage 'first'" in capsys.readouterr().err
    bad = three_stages(zoo)
    bad[1]["parameters"]["t"] = 2.0
    path = write(tmp_path / "bad2.yaml", bad)
    assert main(["merge", str(path), str(tmp_path / "out2"), "--dry-run", "--device", "cpu"]) == 2
    assert "stage second: " in capsys.readouterr().err and not (tmp_path / "out2").exists()


# -- the in-memory API a search uses ---------------------------------------------------------------


def test_fixed_stages_materialized_once_for_a_searched_final_stage(zoo, reference, tmp_path):
    from merge_engine.session import prepare

    stages = parse_stages(three_stages(zoo))
    with StagePipeline(stages, work_parent=tmp_path, device="cpu") as pipe:
        refs = pipe.materialize()
        assert sorted(refs) == ["first", "second"] and pipe.computed == ["first", "second"]
        model, _ = pipe.run()
        assert_state_equal(model.tensors(), load_state(reference))
        # a searched final recipe: fixed stages reused, not recomputed (linear names no base)
        linear = {**three_stages(zoo)[2], "merge_method": "linear", "base_model": None}
        candidate = parse_recipe(linear)
        model, _ = pipe.run({None: candidate})
        assert pipe.computed == ["first", "second", "None", "None"]
        disk = one_by_one(three_stages(zoo)[:2] + [linear], tmp_path / "disk")
        assert_state_equal(model.tensors(), load_state(disk))
        # the same outputs as prepare() readers: a bound recipe plans against them
        bound = pipe.bind(candidate)
        assert str(refs["second"]) in {str(r) for r in bound.referenced_models()}
        with ExitStack() as stack:
            plan, readers = prepare(bound, stack, opened=pipe.readers(bound))
            assert readers[refs["second"]] is pipe.readers()[refs["second"]]
    assert not any(tmp_path.glob(".evomerge-stages-*"))


def test_searched_first_stage_recomputes_only_what_reads_it(zoo, tmp_path):
    docs = three_stages(zoo)
    docs.insert(0, {"name": "side", "merge_method": "linear", "parameters": {"weight": 0.5},
                    "models": [{"model": str(zoo["b"])}, {"model": str(zoo["c"])}]})
    docs[3]["models"].append({"model": "side", "parameters": {"weight": 0.2, "density": 0.9}})
    stages = parse_stages(docs)
    with StagePipeline(stages, work_parent=tmp_path, device="cpu") as pipe:
        pipe.run()
        assert pipe.computed == ["side", "first", "second", "None"]
        searched = {**docs[1], "models": [{"model": str(zoo["a"]), "parameters": {"weight": 0.9}},
                                          {"model": str(zoo["b"]), "parameters": {"weight": 0.1}}]}
        model, _ = pipe.run({"first": parse_recipe(searched)})
        assert pipe.computed[4:] == ["first", "second", "None"]  # side is reused
        disk = one_by_one([docs[0], searched, docs[2], docs[3]], tmp_path / "disk")
        assert_state_equal(model.tensors(), load_state(disk))
    with pytest.raises(RecipeError, match="no stage named 'nope'"):
        with_overrides(stages, {"nope": stages[0].recipe})
