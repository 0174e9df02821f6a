"""The ``tokens_generated`` objective on the vLLM backend: the engine's count equals the hf
backend's for the same greedy generation, loglikelihood requests count nothing, and the search's
objective reads the engine's count (the hf counter is not wrapped around a vLLM evaluator).

Needs vLLM (``pytest -m vllm tests/test_vllm_tokens.py``; skipped when ``import vllm`` fails).
One in-process engine is shared by the module.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import make_tiny_llama, require_vllm, use_hf_home

from evomerge.evaluate import EvalConfig
from evomerge.evaluate.callable import TOKENS_GENERATED, TokenCountingEvaluator
from evomerge.evaluate.hf import HFEvaluator

TASKS = ("smoke_gen", "smoke_mc")
TINY = {"hidden": 256, "heads": 4, "intermediate": 512}  # head_dim 64: vLLM's CPU attention needs it

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    require_vllm()
    from evomerge.candidate import load_causal_lm
    from evomerge.evaluate.vllm import VLLMEvaluator

    root = tmp_path_factory.mktemp("vllm_tokens")
    with pytest.MonkeyPatch.context() as mp:
        use_hf_home(mp, root / "hf_home")
        model, tok = load_causal_lm(make_tiny_llama(root / "a", seed=0, **TINY), dtype="float32")
        with torch.no_grad():  # weights x5: outputs that stop at different lengths (x1 repeats one char)
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.mul_(5)
        # stop strings the x5 model writes now and then: answers end at different lengths
        cfg = EvalConfig(tasks=TASKS, batch_size=8, dtype="float32",
                         lm_eval_args={"gen_kwargs": {"until": ["G", "j", "K"]}})
        hf = TokenCountingEvaluator(HFEvaluator(cfg))
        vl = VLLMEvaluator(cfg.model_copy(update={"backend": "vllm"}))
        yield model, tok, hf, vl
        vl.close()


def answers(evaluator) -> list[str]:
    """The smoke_gen answers of the evaluator's last run, by doc."""
    task = evaluator.runner.task_dict["tasks"]["smoke_gen"]
    return [inst.resps[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


def test_vllm_counts_the_tokens_the_hf_backend_counts(engines):
    model, tok, hf, vl = engines
    with torch.no_grad():
        by_hf = hf.evaluate(model, tok)
    hf_answers = answers(hf)
    by_vllm = vl.evaluate(model, tok)
    assert answers(vl) == hf_answers  # the same greedy answers
    # 24 answers of at most 8 tokens; some met a stop string (ids 99-127 of the tiny vocabulary
    # decode to nothing, so the text's length does not tell which)
    assert 0 < by_vllm.extra[TOKENS_GENERATED] == by_hf.extra[TOKENS_GENERATED] < 24 * 8
    # lm-eval's HF batch runs on until every row stopped; a batch of one counts the same
    with torch.no_grad():
        one = TokenCountingEvaluator(HFEvaluator(hf.cfg.model_copy(update={"batch_size": 1})))
        assert one.evaluate(model, tok).extra[TOKENS_GENERATED] == by_hf.extra[TOKENS_GENERATED]


def test_loglikelihood_requests_count_nothing_and_the_search_reads_the_engine_count(engines):
    model, tok, _, vl = engines
    mc_docs = {"smoke_mc": vl.runner.doc_ids()["smoke_mc"][:6]}
    assert vl.evaluate(model, tok, docs=mc_docs).extra[TOKENS_GENERATED] == 0
    # the search wraps its evaluator in the hf counter; the engine's count is the one kept
    result = TokenCountingEvaluator(vl).evaluate(model, tok)
    assert result.extra[TOKENS_GENERATED] == vl.tokens_generated > 0
