"""`evomerge ablate`'s one library entry point, :func:`evomerge.ablate.ablate`: variables, the
on-demand default (the zoo the CLI builds only when the grid needs it), validation before any
file is written, and a real run of a tiny grid that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures import make_tiny_llama
from evomerge.ablate import ablate

REPO = Path(__file__).resolve().parents[1]
ZOO_GRID = REPO / "ablations" / "zoo_grid.yaml"
MEDICAL = REPO / "ablations" / "medical" / "grid.yaml"

GRID = """\
name: entry
parents:
  - {name: a, model: "${M}/a"}
  - {name: b, model: "${M}/b", evaluate: false}
eval:
  - {name: mc, tasks: [smoke_mc], limit: 3}
recipes:
  - name: lerp
    recipe: {merge_method: linear, models: [{model: a, parameters: {weight: 0.5}},
                                            {model: b, parameters: {weight: BAD}}]}
"""


def refuse():
    raise AssertionError("the default must not be made: the variable is set or unused")


def test_defaults_are_made_only_for_a_variable_the_grid_uses_and_nothing_sets(tmp_path, monkeypatch):
    monkeypatch.delenv("ZOO", raising=False)
    given = ablate(ZOO_GRID, variables={"ZOO": str(tmp_path / "given")}, default_variables={"ZOO": refuse},
                   validate_only=True, check_tasks=False)
    assert given.run is None and all(p.model.startswith(str(tmp_path / "given")) for p in given.grid.parents)
    made: list[str] = []
    default = ablate(ZOO_GRID, default_variables={"ZOO": lambda: made.append("z") or str(tmp_path / "made")},
                     validate_only=True, check_tasks=False)
    assert made == ["z"] and all(p.model.startswith(str(tmp_path / "made")) for p in default.grid.parents)
    monkeypatch.setenv("ZOO", str(tmp_path / "env"))
    assert ablate(ZOO_GRID, default_variables={"ZOO": refuse}, validate_only=True, check_tasks=False).run is None
    medical = ablate(MEDICAL, default_variables={"ZOO": refuse}, validate_only=True, check_tasks=False)
    assert medical.report.problems == [] and medical.run is None


def test_a_grid_with_problems_writes_nothing_and_a_good_one_runs_then_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    base = make_tiny_llama(tmp_path / "m" / "a", seed=1)
    make_tiny_llama(tmp_path / "m" / "b", seed=2, perturb_from=base, scale=0.05)
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    out = tmp_path / "out"
    bad = ablate(path, out, variables={"M": str(tmp_path / "m")}, check_tasks=False)
    assert bad.run is None and any("BAD" in p or "weight" in p for p in bad.report.problems), bad.report.problems
    assert not out.exists()

    path.write_text(GRID.replace("weight: BAD", "weight: 0.5"))
    done = ablate(path, out, variables={"M": str(tmp_path / "m")}, limit=2)
    assert done.report.problems == [] and done.run.evaluated == ["a", "lerp"] and not done.run.failed
    assert all(e.config.limit == 2 for e in done.grid.evals)
    again = ablate(path, out, variables={"M": str(tmp_path / "m")}, limit=2)
    assert again.run.evaluated == [] and sorted(again.run.skipped) == ["a", "lerp"]
    assert (out / "table.md").is_file()
