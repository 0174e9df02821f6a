"""Hostile input, table-driven: each case gives one clear line, a non-zero exit, nothing half-written,
and no traceback unless --debug."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fixtures import load_state, make_sharded, make_tiny_llama
from evomerge.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile_models")
    base = make_tiny_llama(root / "base", seed=0)
    return {"root": root, "base": base, "a": make_tiny_llama(root / "a", seed=1, perturb_from=base),
            "b": make_tiny_llama(root / "b", seed=2, perturb_from=base)}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _recipe(tmp: Path, text: str) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(text)
    return p


def _ta(model: Path, base: Path) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {base}\n"
            f"models:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n")


# each case: build inputs in tmp → argv (OUT is the output dir that must not appear) + expected text
@dataclass
class Case:
    id: str
    build: Callable[[Path, dict], list[str]]
    expect: str


def truncated(tmp, m):
    bad = _copy(m["a"], tmp / "trunc")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["merge", str(_recipe(tmp, _ta(bad, m["base"]))), str(tmp / "OUT")]


def header_overclaims(tmp, m):
    bad = _copy(m["a"], tmp / "overclaim")
    f = bad / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**9]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    return ["merge", str(_recipe(tmp, _ta(bad, m["base"]))), str(tmp / "OUT")]


def index_outside(tmp, m):
    bad = make_sharded(tmp / "sharded", seed=3)
    idx = bad / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = "../../etc/passwd"
    idx.write_text(json.dumps(data))
    return ["validate", str(_recipe(tmp, _ta(bad, m["base"])))]


def pickle_only(tmp, m):
    bad = tmp / "pickled"
    bad.mkdir()
    shutil.copy(m["a"] / "config.json", bad / "config.json")
    torch.save(load_state(m["a"]), bad / "pytorch_model.bin")
    return ["merge", str(_recipe(tmp, _ta(bad, m["base"]))), str(tmp / "OUT")]


def remote_code(tmp, m):
    bad = _copy(m["a"], tmp / "remote")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (bad / "config.json").write_text(json.dumps(cfg))
    return ["merge", str(_recipe(tmp, _ta(bad, m["base"]))), str(tmp / "OUT")]


def nan_checkpoint(tmp, m):
    bad = _copy(m["a"], tmp / "nan")
    state = load_state(m["a"])
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return ["merge", str(_recipe(tmp, _ta(bad, m["base"]))), str(tmp / "OUT")]


def smaller_vocab(tmp, m):
    small = make_tiny_llama(tmp / "small_vocab", seed=4, vocab=100)
    return ["merge", str(_recipe(tmp, _ta(small, m["base"]))), str(tmp / "OUT")]


def malformed_yaml(tmp, m):
    return ["merge", str(_recipe(tmp, "merge_method: linear\nmodels: [\n  - model: x\n")), str(tmp / "OUT")]


def truncated_yaml(tmp, m):
    full = _ta(m["a"], m["base"])
    return ["validate", str(_recipe(tmp, full[: len(full) // 2] + "\n  - {model: "))]


def unknown_keys_wrong_types(tmp, m):
    return ["merge", str(_recipe(tmp, f"merge_method: linear\nmodelz: []\nmodels:\n  - model: {m['a']}\n"
                                      "    parameters: {weight: heavy}\n")), str(tmp / "OUT")]


def missing_model(tmp, m):
    return ["merge", str(_recipe(tmp, _ta(tmp / "no_such_model", m["base"]))), str(tmp / "OUT")]


def unknown_task(tmp, m):
    return ["eval", str(m["a"]), "--tasks", "zoo_add_serach"]


def unreachable_storage(tmp, m):
    return ["worker", "--storage", "postgresql+psycopg2://evo:s3cret@127.0.0.1:1/evomerge", "--study", "x"]


# ---------------------------------------------------------------- hostile search spaces
def _space(tmp: Path, m: dict, text: str | bytes | None = None, **fields) -> list[str]:
    """`evomerge search` of a space over the tiny models (``fields`` override its keys, ``text``
    replaces the whole file), writing into tmp/OUT."""
    if text is None:
        import yaml

        data = {"name": "h", "base_model": str(m["base"]), "method": "task_arithmetic",
                "models": [str(m["a"]), str(m["b"])], "num_layers": 2,
                "eval": {"tasks": ["smoke_mc"], "limit": 2}, **fields}
        text = yaml.safe_dump(data)
    p = tmp / "space.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["search", str(p), "--out", str(tmp / "OUT"), "--trials", "1"]


def space_wrong_types(tmp, m):
    return _space(tmp, m, models=5, budget={"trials": "many"})


def space_bad_range(tmp, m):
    return _space(tmp, m, search={"weight": {"low": 2.0, "high": 1.0}})


def space_nan(tmp, m):
    return _space(tmp, m, search={"weight": {"low": float("nan"), "high": 1.0}})


def space_yaml_bomb(tmp, m):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return _space(tmp, m, text="\n".join(lines) + "\nmodels: *i\n")


def space_huge(tmp, m):
    return _space(tmp, m, text="# " + "x" * (2 << 20) + "\nname: h\n")


def space_not_utf8(tmp, m):
    return _space(tmp, m, text=b"name: \xff\xfe h\nmodels: []\n")


def space_undefined_var(tmp, m):
    return _space(tmp, m, base_model="${NO_SUCH_VAR_EVOMERGE}/base")


def space_other_architecture(tmp, m):
    other = make_tiny_llama(tmp / "wide", seed=5, hidden=96)
    return _space(tmp, m, models=[str(m["a"]), str(other)])


def space_pickle_model(tmp, m):
    pickle_only(tmp, m)  # builds tmp/pickled
    return _space(tmp, m, models=[str(m["a"]), str(tmp / "pickled")])


def space_truncated_model(tmp, m):
    truncated(tmp, m)  # builds tmp/trunc
    return _space(tmp, m, models=[str(m["a"]), str(tmp / "trunc")])


def space_unknown_task(tmp, m):
    return _space(tmp, m, eval={"tasks": ["smoke_mcq"], "limit": 2})


def _task_dir(tmp: Path, data: str | None) -> Path:
    folder = tmp / "tasks"
    folder.mkdir()
    src = Path(__file__).resolve().parents[1] / "eval_tasks" / "smoke" / "smoke_mc.yaml"
    (folder / "mine.yaml").write_text(src.read_text().replace("task: smoke_mc", "task: mine_mc"))
    if data is not None:
        (folder / "smoke_mc.jsonl").write_text(data)
    return folder


def space_missing_data(tmp, m):
    return _space(tmp, m, eval={"tasks": ["mine_mc"], "limit": 2, "include_paths": [str(_task_dir(tmp, None))]})


def space_empty_data(tmp, m):
    return _space(tmp, m, eval={"tasks": ["mine_mc"], "limit": 2, "include_paths": [str(_task_dir(tmp, ""))]})


def eval_truncated(tmp, m):
    truncated(tmp, m)
    return ["eval", str(tmp / "trunc"), "--tasks", "smoke_mc", "--limit", "2"]


def eval_pickle(tmp, m):
    pickle_only(tmp, m)
    return ["eval", str(tmp / "pickled"), "--tasks", "smoke_mc", "--limit", "2"]


CASES = [
    Case("malformed yaml", malformed_yaml, "not valid YAML"),
    Case("truncated yaml", truncated_yaml, "YAML"),
    Case("unknown keys and wrong types", unknown_keys_wrong_types, "modelz"),
    Case("missing model path", missing_model, "does not exist"),
    Case("truncated safetensors", truncated, "truncated"),
    Case("header claims more bytes than the file", header_overclaims, "needs data up to byte"),
    Case("shard index points outside the model", index_outside, "outside"),
    Case("pickle checkpoint without opt-in", pickle_only, "--allow-pickle"),
    Case("trust_remote_code needed", remote_code, "trust-remote-code"),
    Case("inf in a checkpoint", nan_checkpoint, "up_proj"),
    Case("vocabulary sizes differ", smaller_vocab, "vocabulary"),
    Case("eval task name that does not exist", unknown_task, "zoo_add_serach"),
    Case("storage URL that cannot be reached", unreachable_storage, "127.0.0.1:1"),
    Case("space: wrong types", space_wrong_types, "models"),
    Case("space: range low above high", space_bad_range, "weight"),
    Case("space: NaN in a range", space_nan, "weight"),
    Case("space: YAML bomb", space_yaml_bomb, "aliases"),
    Case("space: huge file", space_huge, "bytes"),
    Case("space: not UTF-8", space_not_utf8, "UTF-8"),
    Case("space: undefined variable", space_undefined_var, "NO_SUCH_VAR_EVOMERGE"),
    Case("space: models of another architecture", space_other_architecture, "shape"),
    Case("space: pickle weights, refused before the first trial", space_pickle_model, "--allow-pickle"),
    Case("space: truncated checkpoint", space_truncated_model, "truncated"),
    Case("space: misspelled task", space_unknown_task, "smoke_mcq"),
    Case("space: task data file missing", space_missing_data, "smoke_mc.jsonl"),
    Case("space: task data file empty", space_empty_data, "empty"),
    Case("eval: truncated checkpoint", eval_truncated, "truncated"),
    Case("eval: pickle weights", eval_pickle, "--allow-pickle"),
]


@pytest.mark.parametrize("case", CASES, ids=[getattr(c, "id", None) or c.values[0].id for c in CASES])
def test_hostile_input_gives_one_clear_line(case, models, tmp_path, capsys):
    argv = case.build(tmp_path, models)
    capsys.readouterr()  # drop what building the inputs printed
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    assert case.expect.lower() in err.lower(), err
    assert "s3cret" not in err  # passwords never printed
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    if argv[0] == "search":  # progress lines come first; one error line, and no file written
        lines = [ln for ln in lines if ln.startswith("evomerge")]
    if argv[0] in ("merge", "eval", "worker", "search"):
        assert len(lines) == 1, err
        assert not (tmp_path / "OUT").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".OUT")]


def test_disk_full_while_writing_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path, _ta(models["a"], models["base"]))
    real = os.pwrite

    def full(fd, data, offset):
        if len(data) > 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    capsys.readouterr()
    code = main(["merge", str(recipe), str(tmp_path / "OUT")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "disk full" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "OUT").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".OUT")]


def test_debug_shows_the_traceback(models, tmp_path):
    recipe = _recipe(tmp_path, _ta(tmp_path / "missing", models["base"]))
    cmd = [sys.executable, "-m", "evomerge.cli"]
    plain = subprocess.run(cmd + ["merge", str(recipe), str(tmp_path / "o")], capture_output=True, text=True)
    debug = subprocess.run(cmd + ["--debug", "merge", str(recipe), str(tmp_path / "o")], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr
