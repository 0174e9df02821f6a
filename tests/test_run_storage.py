"""One search run opens its storage once (a new study, and a resumed one), on a real SQLite study
with tiny real Llamas and a real lm-eval task."""

from __future__ import annotations

from optuna.storages import RDBStorage
from optuna.trial import TrialState
from spaces import math_code_space

import evomerge.search.study as study_module
from evomerge.search.run import RunOptions, run_search
from evomerge.space import parse_space


def test_a_run_opens_its_storage_once_new_or_resumed(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    opened: list[str] = []

    class CountingRDBStorage(RDBStorage):
        """The real storage, counting how often a run constructs one."""

        def __init__(self, url, *args, **kwargs):
            opened.append(url)
            super().__init__(url, *args, **kwargs)

    monkeypatch.setattr(study_module, "RDBStorage", CountingRDBStorage)
    space = parse_space(math_code_space(zoo, name="once", sampler="random", top_k=1))
    out = tmp_path / "run"
    for trials in (1, 2):  # a new study, then the same folder resumed with one more trial
        opened.clear()
        summary = run_search(space, RunOptions(out_dir=out, trials=trials))
        assert summary.finished == trials and len(opened) == 1, opened
    from evomerge.search.study import load_stored_study, open_storage

    stored = load_stored_study(open_storage(summary.storage), "once")
    assert [t.state for t in stored.trials] == [TrialState.COMPLETE] * 2
