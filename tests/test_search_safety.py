"""Never half-written, never lost, always one line: what `evomerge search`, `worker` and `export`
do with bad input and faults, on tiny real Llamas, real lm-eval tasks and real SQLite storage."""

from __future__ import annotations

import errno
import functools
import os
import stat
import tempfile

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from spaces import math_code_space

from evomerge.cli import build_parser, main
from evomerge.errors import EXIT_CODES
from evomerge.results.store import ranking_note, top_trials
from evomerge.search.preflight import sampler_seed
from evomerge.search.run import RunOptions, run_search, run_worker
from evomerge.search.study import default_storage
from evomerge.space import parse_space


pytestmark = pytest.mark.usefixtures("hf_home_in_tmp")


space_dict = functools.partial(math_code_space, top_k=1, seed=3)


def write_space(tmp_path, data, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def stored(out, name="t"):
    return optuna.load_study(study_name=name, storage=default_storage(out)).get_trials()


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("evomerge: error")]


def test_misspelled_task_writes_nothing_and_the_corrected_command_runs(zoo, tmp_path, capsys):
    out = tmp_path / "run"
    bad = write_space(tmp_path, space_dict(zoo, eval={"tasks": ["smoke_mcq"], "limit": 4}))
    assert main(["search", str(bad), "--out", str(out), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "smoke_mcq" in err and "Traceback" not in err
    assert not out.exists()
    good = write_space(tmp_path, space_dict(zoo))
    assert main(["search", str(good), "--out", str(out), "--trials", "1"]) == 0
    assert [t.state for t in stored(out)] == [TrialState.COMPLETE]


@pytest.mark.parametrize("argv", [
    ["search", "s.yaml", "--trials", "-1"], ["search", "s.yaml", "--trials", "two"],
    ["search", "s.yaml", "--timeout", "-5"], ["search", "s.yaml", "--timeout", "nan"],
    ["search", "s.yaml", "--timeout", "0"], ["worker", "--storage", "x", "--study", "y", "--trials", "-3"],
    ["demo", "--trials", "-1"], ["merge", "r.yaml", "out", "--shard-size", "-1G"],
    ["eval", "m", "--tasks", "t", "--batch-size", "0"], ["eval", "m", "--tasks", "t", "--num-fewshot", "-1"],
    ["eval", "m", "--tasks", "t", "--seed", "-2"], ["zoo", "build", "--seed", "-1"],
])
def test_out_of_range_numbers_are_refused_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("evomerge") and "error" in err[-1]


def test_trials_zero_means_the_budget_and_help_lists_exit_codes():
    assert build_parser().parse_args(["search", "s.yaml", "--trials", "0"]).trials == 0
    text = build_parser().format_help()
    for code in EXIT_CODES:
        assert f"  {code:>3}  " in text
    with pytest.raises(Exception, match="trials"):
        RunOptions(out_dir=".", trials=-1)


def test_a_folder_of_another_study_is_refused_and_a_resume_says_so(zoo, tmp_path, capsys):
    out = tmp_path / "run"
    space = write_space(tmp_path, space_dict(zoo))
    assert main(["search", str(space), "--out", str(out), "--trials", "1"]) == 0
    capsys.readouterr()
    assert main(["search", str(space), "--out", str(out), "--trials", "1", "--study", "other"]) == 3
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and str(out) in err and "--out" in err and "'t'" in err
    assert optuna.get_all_study_names(default_storage(out)) == ["t"]
    assert main(["search", str(space), "--out", str(out), "--trials", "2"]) == 0
    assert "resuming study t (1 finished trials)" in capsys.readouterr().err
    assert len(stored(out)) == 2


def test_export_of_a_missing_database_or_study_creates_nothing(zoo, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "study.db"
    code = main(["export", "--storage", f"sqlite:///{missing}", "--study", "t", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 3 and len(err.strip().splitlines()) == 1 and str(missing) in err
    assert not missing.parent.exists() and not (tmp_path / "o").exists()
    here = tmp_path / "study.db"
    optuna.create_study(study_name="a", storage=f"sqlite:///{here}")
    code = main(["export", "--storage", f"sqlite:///{here}", "--study", "b", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no study 'b'" in err and "['a']" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_study_database_is_one_line(zoo, tmp_path, capsys, damage):
    out = tmp_path / "run"
    out.mkdir()
    db = out / "study.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:
        optuna.create_study(study_name="t", storage=default_storage(out))
        db.write_bytes(db.read_bytes()[:3000])
    space = write_space(tmp_path, space_dict(zoo))
    code = main(["search", str(space), "--out", str(out), "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 3 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert "damaged" in err or "cannot open storage" in err


def test_merged_folders_get_the_umask_permissions(zoo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {zoo / 'math'}\n"
                      f"    parameters: {{weight: 0.5}}\n  - model: {zoo / 'code'}\n"
                      "    parameters: {weight: 0.5}\n")
    old = os.umask(0o022)
    try:
        assert main(["merge", str(recipe), str(tmp_path / "m")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


def read_only_disk(monkeypatch) -> None:
    """Stands for a read-only file system (this test runs as root, whom chmod does not stop):
    creating a file or folder fails with EROFS, as it would there."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


def test_read_only_disk_while_writing_results_is_one_line_and_keeps_the_trials(zoo, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "run"
    space = write_space(tmp_path, space_dict(zoo))
    assert main(["search", str(space), "--out", str(out), "--trials", "1"]) == 0
    before = (out / "trials.csv").read_text()
    capsys.readouterr()
    with monkeypatch.context() as m:
        read_only_disk(m)
        code = main(["export", "--storage", default_storage(out), "--study", "t", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and len(err.strip().splitlines()) == 1 and "Read-only" in err, err
    assert (out / "trials.csv").read_text() == before
    assert [t.state for t in stored(out)] == [TrialState.COMPLETE]
    recipe = out / "best" / next(p.name for p in (out / "best").glob("*.yaml"))
    with monkeypatch.context() as m:  # and while merging
        read_only_disk(m)
        code = main(["merge", str(recipe), str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 3 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "merged").exists()


def test_sampler_seeds_differ_per_worker_and_resume_but_not_for_one_run():
    assert sampler_seed(3, None) == sampler_seed(3, 0) == 3
    seeds = {sampler_seed(3, 5), sampler_seed(3, 6), sampler_seed(3, 5, worker=1),
             sampler_seed(3, 5, worker=2), sampler_seed(3, 0, worker=3)}
    assert len(seeds) == 5 and 3 not in seeds
    # worker k's seed depends on the space's seed and k only: reproducible
    assert sampler_seed(3, 9, worker=1) == sampler_seed(3, None, worker=1) != sampler_seed(4, 9, worker=1)


def test_a_resumed_search_does_not_propose_the_same_candidates_again(zoo, tmp_path):
    space = parse_space(space_dict(zoo, sampler="random"))
    run_search(space, RunOptions(out_dir=tmp_path / "a", trials=3))
    run_search(space, RunOptions(out_dir=tmp_path / "b", trials=3))
    one_run = [t.params for t in stored(tmp_path / "a")]
    assert one_run == [t.params for t in stored(tmp_path / "b")]  # one run is reproducible
    run_search(space, RunOptions(out_dir=tmp_path / "c", trials=2))
    run_search(space, RunOptions(out_dir=tmp_path / "c", trials=3))
    resumed = [t.params for t in stored(tmp_path / "c")]
    assert resumed[:2] == one_run[:2] and resumed[2] != one_run[2]


def test_a_worker_needs_no_start_recipe_file(zoo, tmp_path):
    start = tmp_path / "start.yaml"
    start.write_text(f"merge_method: task_arithmetic\nbase_model: {zoo / 'base'}\nmodels:\n"
                     f"  - model: {zoo / 'math'}\n    parameters: {{weight: 0.7}}\n"
                     f"  - model: {zoo / 'code'}\n    parameters: {{weight: 0.2}}\n")
    space = parse_space(space_dict(zoo, start=[{"recipe": str(start)}]))
    out = tmp_path / "run"
    run_search(space, RunOptions(out_dir=out, trials=1))
    start.unlink()
    summary = run_worker(default_storage(out), "t", trials=2)
    assert summary.finished == 2
    trials = stored(out)
    assert trials[0].user_attrs["start_point"].startswith("recipe:")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


def _study_with(values: list[list[float]], weights: list[float]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("objectives", ["a", "b"])
    study.set_user_attr("space", {"eval": {"tasks": [{"name": "a", "weight": weights[0]},
                                                     {"name": "b", "weight": weights[1]}]}})
    dist = {"x": FloatDistribution(0, 1)}
    for v in values:
        study.add_trial(create_trial(values=v, params={"x": 0.5}, distributions=dist))
    return study


def test_several_objectives_rank_pareto_trials_by_the_task_weights():
    values = [[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.4, 0.4]]  # trial 3 is dominated by trial 2
    study = _study_with(values, [1.0, 1.0])
    assert [t.number for t in top_trials(study, 4)] == [0, 1, 2]  # equal sums: by number
    assert [t.number for t in top_trials(_study_with(values, [3.0, 1.0]), 3)] == [0, 2, 1]
    assert [t.number for t in top_trials(_study_with(values, [1.0, 3.0]), 1)] == [1]
    assert "Pareto" in ranking_note(study) and "1*a + 1*b" in ranking_note(study)


def test_a_cost_in_millions_does_not_swamp_accuracy_when_ranking_the_front():
    """Each objective is scaled to the front's range before the weighted sum: with raw values a
    parameter count (weight -1) would pick the smallest model whatever its accuracy."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["score", "params"])
    dist = {"x": FloatDistribution(0, 1)}
    for v in ([0.80, 2_000_000], [0.45, 1_900_000], [0.78, 1_950_000]):
        study.add_trial(create_trial(values=v, params={"x": 0.5}, distributions=dist))
    # scaled: trial 0 = 1 - 1 = 0, trial 1 = 0 - 0 = 0, trial 2 = 0.94 - 0.5 = 0.44
    assert [t.number for t in top_trials(study, 3)] == [2, 0, 1]
    assert "scaled to [0, 1]" in ranking_note(study)


def test_noise_of_libraries_is_filtered_by_message_only(zoo, caplog):
    """lm-eval's real warning for a loaded model is dropped; its other warnings still show."""
    import logging

    from lm_eval.models.huggingface import HFLM

    from evomerge.candidate import load_causal_lm
    from evomerge.cli.common import silence_noise

    silence_noise()
    model, tokenizer = load_causal_lm(zoo / "base")
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.huggingface"):
        HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        logging.getLogger("lm_eval.models.huggingface").warning("another warning")
    assert "pretrained" not in caplog.text and "another warning" in caplog.text
