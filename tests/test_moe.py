"""`evomerge moe` / merge_engine.moe: MoE models from dense experts, on tiny real checkpoints.

Outputs load in transformers with every weight used and generate; one expert (or identical
experts) gives the dense model's logits; router rows match an independent computation through
transformers' ``output_hidden_states``; the in-memory build is bit-identical to the disk build.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import load_state, make_tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from merge_engine.moe import build_moe, build_moe_in_memory, load_moe_model, parse_moe_config

IDS = torch.tensor([[1, 40, 41, 42, 69, 70, 71, 5, 6]])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = make_tiny_llama(root / "base", 0)
    return {"root": root, "base": base,
            "a": make_tiny_llama(root / "a", 1, perturb_from=base, scale=0.05),
            "b": make_tiny_llama(root / "b", 2, perturb_from=base, scale=0.05)}


def two_experts(zoo, **extra):
    data = {"base_model": str(zoo["base"]), "dtype": "float32", "experts": [
        {"source_model": str(zoo["a"]), "positive_prompts": ["abc def", "x"], "negative_prompts": ["zz top!"]},
        {"source_model": str(zoo["b"]), "positive_prompts": ["hello world", "1 2 3 4"]}]}
    data.update(extra)
    return parse_moe_config(data)


def load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def independent_rows(model_dir, prompt_sets, *, last=True):
    """Router rows the slow, obvious way: transformers' output_hidden_states on the padded batch."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id

    def vec(prompts):
        batch = tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states
        stacked = torch.stack(states[:-1])  # the input of every layer: (layers, batch, seq, hidden)
        picked = stacked[:, :, -1] if last else stacked.mean(dim=2)
        return picked.mean(dim=1)

    rows = []
    for positive, negative in prompt_sets:
        v = vec(positive) - (vec(negative) if negative else 0)
        rows.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(rows, dim=1)


def routers(state, names):
    return torch.stack([state[n] for n in names])


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_routers_match_output_hidden_states(zoo, tmp_path, mode):
    config = two_experts(zoo, gate_mode=mode)
    result = build_moe(config, tmp_path / "out", device="cpu", router_dtype="float32")
    assert result.architecture == "Mixtral"
    state = load_state(tmp_path / "out")
    got = routers(state, [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)])
    sets = [(["abc def", "x"], ["zz top!"]), (["hello world", "1 2 3 4"], [])]
    want = independent_rows(zoo["base"], sets, last=mode == "hidden")
    assert got.shape == (2, 2, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])  # layers differ: states really are per layer


def test_cheap_embed_routers_are_summed_embeddings(zoo, tmp_path):
    built = build_moe_in_memory(two_experts(zoo, gate_mode="cheap_embed"), device="cpu")
    embed = load_state(zoo["base"])["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(zoo["base"])

    def vec(prompts):  # one-hot sums over real tokens (BOS prepended), unit length
        counts = torch.zeros(embed.shape[0])
        for p in prompts:
            for t in [tok.bos_token_id] + tok(p, add_special_tokens=False).input_ids:
                counts[t] += 1
        v = counts @ embed
        return v / v.norm()

    a = vec(["abc def", "x"]) - vec(["zz top!"])
    want = torch.stack([a / a.norm(), vec(["hello world", "1 2 3 4"])])
    for i in range(2):
        torch.testing.assert_close(built.state[f"model.layers.{i}.block_sparse_moe.gate.weight"], want)


def test_mixtral_loads_generates_and_in_memory_equals_disk(zoo, tmp_path):
    config = two_experts(zoo, gate_mode="hidden", experts=[
        {"source_model": str(zoo["a"]), "positive_prompts": ["abc"], "noise_scale": 0.01},
        {"source_model": str(zoo["b"]), "positive_prompts": ["xyz"], "residual_scale": 0.5}])
    build_moe(config, tmp_path / "out", device="cpu", seed=7)
    disk = load_state(tmp_path / "out")
    built = build_moe_in_memory(config, device="cpu", seed=7)
    assert disk.keys() == built.state.keys()
    assert all(torch.equal(disk[k], built.state[k]) for k in disk)
    # the experts are the dense MLPs: noised (seeded) for a, down_proj halved for b
    a, b = load_state(zoo["a"]), load_state(zoo["b"])
    w1 = disk["model.layers.1.block_sparse_moe.experts.0.w1.weight"]
    src = a["model.layers.1.mlp.gate_proj.weight"]
    assert 0.005 < (w1 - src).std() < 0.015
    torch.testing.assert_close(disk["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                               b["model.layers.1.mlp.down_proj.weight"] * 0.5)
    torch.testing.assert_close(disk["model.layers.1.block_sparse_moe.experts.1.w3.weight"],
                               b["model.layers.1.mlp.up_proj.weight"], rtol=0, atol=0)
    assert disk["model.embed_tokens.weight"].equal(load_state(zoo["base"])["model.embed_tokens.weight"])
    seeded = build_moe_in_memory(config, device="cpu", seed=8)
    assert not seeded.state["model.layers.1.block_sparse_moe.experts.0.w1.weight"].equal(w1)

    model = load(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    torch.testing.assert_close(logits(model), logits(load_moe_model(built)), rtol=0, atol=0)
    out = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.decode(out[0, -4:])  # the base's tokenizer travels with the model
    assert (tmp_path / "out" / "mergekit_moe_config.yml").is_file()


def test_one_expert_or_identical_experts_give_the_dense_logits(zoo, tmp_path):
    dense = logits(load(zoo["a"]))
    one = parse_moe_config({"base_model": str(zoo["a"]), "experts_per_token": 1, "gate_mode": "random",
                            "experts": [{"source_model": str(zoo["a"])}]})
    build_moe(one, tmp_path / "one", device="cpu")
    torch.testing.assert_close(logits(load(tmp_path / "one")), dense, rtol=1e-5, atol=1e-5)
    same = parse_moe_config({"base_model": str(zoo["a"]), "experts": [
        {"source_model": str(zoo["a"]), "positive_prompts": ["abc"]},
        {"source_model": str(zoo["a"]), "positive_prompts": ["xyz"]}]})
    built = build_moe_in_memory(same, device="cpu", allow_same_experts=True)
    torch.testing.assert_close(logits(load_moe_model(built)), dense, rtol=1e-5, atol=1e-5)


def test_qwen_moe_with_shared_expert_loads_and_generates(zoo, tmp_path):
    config = two_experts(zoo, gate_mode="hidden", architecture="qwen",
                         shared_experts=[{"source_model": str(zoo["base"]), "positive_prompts": ["hi there"]}])
    result = build_moe(config, tmp_path / "out", device="cpu", router_dtype="float32")
    assert result.architecture == "Qwen MoE"
    state = load_state(tmp_path / "out")
    base = load_state(zoo["base"])
    assert state["model.layers.0.self_attn.q_proj.bias"].abs().sum() == 0  # Qwen2-MoE needs biases
    assert state["model.layers.0.mlp.shared_expert.down_proj.weight"].equal(base["model.layers.0.mlp.down_proj.weight"])
    want = independent_rows(zoo["base"], [(["hi there"], [])])[:, 0]
    torch.testing.assert_close(state["model.layers.1.mlp.shared_expert_gate.weight"][0], want[1],
                               atol=1e-5, rtol=1e-5)
    model = load(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)


def make_tiny_qwen3(path, seed):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tiny_tokenizer(128).save_pretrained(path)
    return path


def test_qwen3_moe_from_qwen3_experts_matches_dense(tmp_path):
    dense_dir = make_tiny_qwen3(tmp_path / "q", 3)
    one = parse_moe_config({"base_model": str(dense_dir), "experts_per_token": 1,
                            "experts": [{"source_model": str(dense_dir), "positive_prompts": ["abc"]}]})
    result = build_moe(one, tmp_path / "out", device="cpu")
    assert result.architecture == "Qwen3 MoE"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen3_moe"
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(load(dense_dir)), rtol=1e-5, atol=1e-5)


def test_random_routers_are_seeded_and_shaped(zoo):
    config = two_experts(zoo, gate_mode="uniform_random")
    r1 = build_moe_in_memory(config, device="cpu", seed=1).state["model.layers.0.block_sparse_moe.gate.weight"]
    r2 = build_moe_in_memory(config, device="cpu", seed=1).state["model.layers.0.block_sparse_moe.gate.weight"]
    assert r1.equal(r2) and r1.shape == (2, 64)
    assert r1.abs().max() <= 64 ** -0.5  # torch.nn.Linear's default bound


def test_builder_keeps_models_and_prompt_states_across_builds(zoo, tmp_path):
    from merge_engine.moe import MoEBuilder

    first = two_experts(zoo, gate_mode="hidden")
    swapped = parse_moe_config({"base_model": str(zoo["base"]), "dtype": "float32", "experts": [
        {"source_model": str(zoo["b"]), "positive_prompts": ["hello world", "1 2 3 4"]},
        {"source_model": str(zoo["a"]), "positive_prompts": ["abc def", "x"], "negative_prompts": ["zz top!"]}]})
    with MoEBuilder(device="cpu", router_dtype="float32") as builder:
        one = builder.build(first)
        two = builder.build(swapped)
        (states,) = builder.states.values()
        assert states.passes == 3  # three prompt lists, each run once
    alone = build_moe_in_memory(swapped, device="cpu", router_dtype="float32")
    assert all(torch.equal(two.state[k], alone.state[k]) for k in alone.state)
    r1 = one.state["model.layers.1.block_sparse_moe.gate.weight"]
    r2 = two.state["model.layers.1.block_sparse_moe.gate.weight"]
    assert torch.equal(r1, r2.flip(0))  # the same rows, experts swapped
