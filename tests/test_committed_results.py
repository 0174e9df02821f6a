"""Committed outputs under results/: recipes name their models as ``${ZOO}/...`` and validate
from the repository once ``ZOO`` is given; provenance versions agree with pyproject.toml."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from fixtures import make_tiny_llama

from evomerge.cli import main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def committed_recipes() -> list[Path]:
    paths = [p for p in sorted(RESULTS.rglob("*.yaml"))
             if "dataflow" not in p.parts  # deep-zoo recipes: tests/test_zoo_deep.py validates them
             and isinstance(data := yaml.safe_load(p.read_text()), dict) and "merge_method" in data]
    assert len(paths) >= 8  # 3 demo recipes, 5 ablation rows
    return paths


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A folder shaped like the demo zoo (its folder names and 2 layers), of tiny models."""
    d = tmp_path_factory.mktemp("demo_zoo")
    base = make_tiny_llama(d / "base", 0, num_layers=2)
    for i, skill in enumerate(("add", "sort", "shift"), 1):
        make_tiny_llama(d / f"{skill}_expert", i, num_layers=2, perturb_from=base)
    return d


def test_every_committed_recipe_validates_with_zoo_var(zoo, capsys, monkeypatch):
    monkeypatch.delenv("ZOO", raising=False)
    for path in committed_recipes():
        text = path.read_text()
        assert "/tmp/" not in text and "${ZOO}/" in text, path
        assert main(["validate", str(path), "--var", f"ZOO={zoo}"]) == 0, capsys.readouterr().err
    # The environment serves as well (`ZOO=... evomerge merge best/x.yaml OUT`).
    monkeypatch.setenv("ZOO", str(zoo))
    assert main(["merge", str(path), str(zoo / "out"), "--dry-run", "--device", "cpu"]) == 0


def test_unset_zoo_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("ZOO", raising=False)
    path = committed_recipes()[0]
    assert main(["merge", str(path), "out", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "${ZOO} is not set; pass --var ZOO=VALUE" in err
    # validate lists it among the recipe's problems (exit 1, as for any invalid recipe)
    assert main(["validate", str(path)]) == 1
    assert "${ZOO} is not set; pass --var ZOO=VALUE" in capsys.readouterr().err


def test_demo_space_loads_with_zoo_var(zoo):
    from evomerge.space import load_space

    space = load_space(RESULTS / "demo" / "space.yaml", variables={"ZOO": str(zoo)})
    assert space.base_model.model == str(zoo / "base")


def test_provenance_names_zoo_models_and_the_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    files = [p for p in sorted(RESULTS.rglob("*.json")) if "versions" in json.loads(p.read_text())]
    assert len(files) >= 10
    for path in files:
        data = json.loads(path.read_text())
        ours = {k: v for k, v in data["versions"].items() if k.startswith("evomerge")}
        assert ours and set(ours.values()) == {version}, (path, ours)
        for model in data.get("checkpoints_sha256", {}):
            assert model.startswith("${ZOO}/"), (path, model)
        assert not re.search(r'"/tmp/democache', path.read_text()), path
