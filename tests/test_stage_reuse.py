"""Kept intermediate stages (``--intermediate-dir``) on tiny real checkpoints: a folder holding a
complete merge of the same stage recipe is reused, not rewritten; a folder holding anything else
(another recipe, a user's folder, an incomplete merge) is refused in one line before any stage
runs, and replaced only with ``force``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import make_abc_zoo
from test_multistage import assert_same_model, three_stages, write

from merge_engine.errors import OutputExistsError
from merge_engine.kept_stages import stage_digest
from merge_engine.multistage import StagePipeline, run_stages
from merge_engine.stages import parse_stages


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return make_abc_zoo(tmp_path_factory.mktemp("reusezoo"))


@pytest.fixture(scope="module")
def kept(zoo, tmp_path_factory) -> tuple[Path, Path]:
    """A first run keeping its intermediates: (the kept folder, the final output)."""
    root = tmp_path_factory.mktemp("kept")
    run_stages(parse_stages(three_stages(zoo)), root / "out", device="cpu", keep_dir=root / "keep")
    return root / "keep", root / "out"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: a rewritten folder changes them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def copy_keep(keep: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(keep, to)
    return to


def never(stage, done, total):
    raise AssertionError(f"stage {stage} merged a tensor")


def test_the_same_recipe_reuses_every_kept_stage(zoo, kept, tmp_path):
    keep = copy_keep(kept[0], tmp_path / "keep")
    before = {name: snapshot(keep / name) for name in ("first", "second")}
    docs = three_stages(zoo)
    docs[2]["models"][0]["parameters"]["weight"] = 0.9  # only the final stage changes
    with StagePipeline(parse_stages(docs), keep_dir=keep, device="cpu", work_parent=tmp_path) as pipe:
        pipe.write_final(tmp_path / "out")
        assert pipe.reused == ["first", "second"] and pipe.computed == ["None"]
    assert {name: snapshot(keep / name) for name in ("first", "second")} == before
    # the same bytes as a run that merges every stage
    run_stages(parse_stages(docs), tmp_path / "fresh", device="cpu")
    assert_same_model(tmp_path / "out", tmp_path / "fresh")
    with StagePipeline(parse_stages(three_stages(zoo)), keep_dir=keep, device="cpu", work_parent=tmp_path) as pipe:
        pipe.write_final(tmp_path / "again")
    assert_same_model(tmp_path / "again", kept[1])


def test_a_changed_stage_is_refused_before_any_stage_runs_and_replaced_with_force(zoo, kept, tmp_path):
    keep = copy_keep(kept[0], tmp_path / "keep")
    before = snapshot(keep / "second")
    docs = three_stages(zoo)
    docs[1]["parameters"]["t"] = [0.5, 0.5]  # second changes; first does not
    with pytest.raises(OutputExistsError) as err:
        run_stages(parse_stages(docs), tmp_path / "out", device="cpu", keep_dir=keep, progress=never)
    assert str(err.value) == (f"intermediate folder {keep / 'second'} holds a merge of another recipe for stage "
                              "second (or of other stages it reads); remove it, give another --intermediate-dir, "
                              "or pass --force to replace it")
    assert snapshot(keep / "second") == before and not (tmp_path / "out").exists()
    with StagePipeline(parse_stages(docs), keep_dir=keep, device="cpu", force=True, work_parent=tmp_path) as pipe:
        pipe.write_final(tmp_path / "out")
        assert pipe.reused == ["first"] and pipe.computed == ["second", "None"]
    run_stages(parse_stages(docs), tmp_path / "fresh", device="cpu")
    assert_same_model(tmp_path / "out", tmp_path / "fresh")
    # a stage reading a changed stage is not current either, though its own recipe is the same
    docs = three_stages(zoo)
    docs[0]["models"][0]["parameters"]["weight"] = 0.4
    with pytest.raises(OutputExistsError, match="holds a merge of another recipe for stage first"):
        run_stages(parse_stages(docs), tmp_path / "out2", device="cpu", keep_dir=copy_keep(kept[0], tmp_path / "k2"))
    stages = parse_stages(three_stages(zoo))
    changed = parse_stages(docs)
    assert stage_digest(stages[1], stages) != stage_digest(changed[1], changed)
    assert stage_digest(stages[1], stages) != stage_digest(stages[1], stages, "bfloat16")


@pytest.mark.parametrize("spoil, held", [
    (lambda d: (d / "notes.txt").write_text("mine"), "no kept evomerge stage"),
    (lambda d: (d / "model.safetensors").unlink(), "an incomplete merge of stage first"),
])
def test_a_folder_holding_anything_else_is_refused(zoo, kept, tmp_path, spoil, held):
    keep = tmp_path / "keep"
    if held.startswith("no kept"):
        (keep / "first").mkdir(parents=True)
    else:
        copy_keep(kept[0], keep)
    spoil(keep / "first")
    before = snapshot(keep / "first")
    with pytest.raises(OutputExistsError, match=f"{keep / 'first'} holds {held}; remove it"):
        run_stages(parse_stages(three_stages(zoo)), tmp_path / "out", device="cpu", keep_dir=keep, progress=never)
    assert snapshot(keep / "first") == before and not (tmp_path / "out").exists()


def test_cli_reuses_and_refuses(zoo, kept, tmp_path, capsys):
    from evomerge.cli import main

    keep = copy_keep(kept[0], tmp_path / "keep")
    path = write(tmp_path / "multi.yaml", three_stages(zoo))
    assert main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "--intermediate-dir", str(keep)]) == 0
    assert_same_model(tmp_path / "out", kept[1])
    docs = three_stages(zoo)
    docs[0]["chat_template"] = "alpaca"
    path = write(tmp_path / "changed.yaml", docs)
    capsys.readouterr()
    assert main(["merge", str(path), str(tmp_path / "out2"), "--device", "cpu", "--intermediate-dir", str(keep)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a merge of another recipe for stage first" in err[0]
