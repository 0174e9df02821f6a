"""Output tokenizers and vocabulary rows (tokenizer_source / tokenizer: block), on tiny real checkpoints.

Inputs: ``base`` (99 tokens in 128 rows), ``med`` (base's tokens + plain "ab" at 99 + special
"<|med|>" at 100), ``med2`` (the same vocabulary, other noise), ``rev`` (base's tokens, characters
in reverse order). Expected rows are computed here from the inputs' rows by token text.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from fixtures import load_state, make_tiny_llama, make_vocab_variant

from merge_engine.errors import RecipeError
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe
from merge_engine.session import validate

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = make_tiny_llama(root / "base", 0)
    return {
        "base": base,
        "med": make_vocab_variant(root / "med", base, 1, plain=("ab",), specials=("<|med|>",)),
        "med2": make_vocab_variant(root / "med2", base, 3, plain=("ab",), specials=("<|med|>",)),
        "rev": make_vocab_variant(root / "rev", base, 2, reverse=True),
    }


def vocab(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def row(model_dir, token, name=EMB):
    """The row of ``token`` in a model's tensor ``name``, looked up through its own tokenizer."""
    return load_state(model_dir)[name][vocab(model_dir)[token]]


def merge(zoo, tmp_path, text):
    recipe = parse_recipe(yaml.safe_load(text.format(**{k: str(v) for k, v in zoo.items()})))
    out = tmp_path / "out"
    run_merge(recipe, out, device="cpu")
    return out


def test_tokenizer_block_defaults_to_union():
    r = parse_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "tokenizer": {}})
    assert r.tokenizer_source_setting() == "union"
    assert str(r.tokenizer_model()) == "a"
    assert parse_recipe({"merge_method": "linear", "models": [{"model": "a"}]}).tokenizer_source_setting() is None


def test_union_adds_tokens_and_fills_rows(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(zoo, tmp_path, """
merge_method: linear
models: [{{model: {base}, parameters: {{weight: 0.5}}}}, {{model: {med}, parameters: {{weight: 0.5}}}}]
tokenizer_source: union
""")
    tok = AutoTokenizer.from_pretrained(out)
    v = tok.get_vocab()
    assert len(v) == 101 and v["<|med|>"] == 100 and v["ab"] == 99
    assert all(v[t] == i for t, i in vocab(zoo["base"]).items())  # base's ids kept
    assert tok("x<|med|>").input_ids == [v["x"], 100]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 101
    state = load_state(out)
    assert state[EMB].shape == (101, 64) and state[HEAD].shape == (101, 64)
    for name in (EMB, HEAD):
        # a shared token: each model's own row; a token only med has: med's row for both
        want = 0.5 * row(zoo["base"], "x", name) + 0.5 * row(zoo["med"], "x", name)
        torch.testing.assert_close(state[name][v["x"]], want)
        torch.testing.assert_close(state[name][100], row(zoo["med"], "<|med|>", name))
        torch.testing.assert_close(state[name][99], row(zoo["med"], "ab", name))


def test_different_order_is_matched_by_token(zoo, tmp_path):
    out = merge(zoo, tmp_path, """
merge_method: linear
models: [{{model: {base}, parameters: {{weight: 0.25}}}}, {{model: {rev}, parameters: {{weight: 0.75}}}}]
tokenizer: {{source: {rev}}}
""")
    v = vocab(out)
    assert v == vocab(zoo["rev"])
    state = load_state(out)
    assert state[EMB].shape[0] == 99
    for token in ("a", "~", "<s>"):
        want = 0.25 * row(zoo["base"], token) + 0.75 * row(zoo["rev"], token)
        torch.testing.assert_close(state[EMB][v[token]], want)


def test_missing_token_takes_mean_or_base_row(zoo, tmp_path):
    # no base: base lacks <|med|>, med and med2 have it -> base's row is their mean
    out = merge(zoo, tmp_path, """
merge_method: linear
models: [{{model: {base}}}, {{model: {med}}}, {{model: {med2}}}]
parameters: {{weight: 1.0}}
tokenizer: {{}}
""")
    m1, m2 = row(zoo["med"], "<|med|>"), row(zoo["med2"], "<|med|>")
    torch.testing.assert_close(load_state(out)[EMB][100], ((m1 + m2) / 2 + m1 + m2) / 3)
    # base_model med among the holders: base takes med's row
    out2 = merge(zoo, tmp_path / "b", """
merge_method: linear
base_model: {med}
models: [{{model: {base}}}, {{model: {med}}}, {{model: {med2}}}]
parameters: {{weight: 1.0}}
tokenizer: {{}}
""")
    torch.testing.assert_close(load_state(out2)[EMB][100], (m1 + m1 + m2) / 3)


def test_tokens_settings_and_padding(zoo, tmp_path):
    out = merge(zoo, tmp_path, """
merge_method: linear
models: [{{model: {base}, parameters: {{weight: 0.5}}}}, {{model: {med}, parameters: {{weight: 0.5}}}}]
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    "<|med|>": {{source: {{kind: zero}}}}
    "x": {{source: {base}, force: true}}
    "<|new|>": {{source: {{kind: model_token, model: {med}, token: "y"}}}}
""")
    v = vocab(out)
    state = load_state(out)[EMB]
    assert v["<|new|>"] == 101 and state.shape == (128, 64)
    # zero: only for base, which lacks it (no force); forced x: base's row for both
    torch.testing.assert_close(state[v["<|med|>"]], 0.5 * row(zoo["med"], "<|med|>"))
    torch.testing.assert_close(state[v["x"]], row(zoo["base"], "x"))
    torch.testing.assert_close(state[v["<|new|>"]], row(zoo["med"], "y"))
    torch.testing.assert_close(state[102:], state[:102].mean(0).expand(26, -1))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).vocab_size == 128


def test_token_setting_problems_are_one_line(zoo, tmp_path):
    text = """
merge_method: linear
models: [{{model: {base}}}, {{model: {med}}}]
parameters: {{weight: 1.0}}
tokenizer:
  tokens: {{"<|med|>": {src}}}
"""
    def recipe(src):
        return parse_recipe(yaml.safe_load(text.format(src=src, **{k: str(v) for k, v in zoo.items()})))

    report = validate(recipe(f"{{source: {zoo['rev']}}}"))
    assert any("not merged by this recipe" in p for p in report.problems)
    report = validate(recipe("{force: true}"))
    assert any("has no source" in p for p in report.problems)
    with pytest.raises(RecipeError, match="has no token"):
        run_merge(recipe(f"{{source: {zoo['base']}}}"), tmp_path / "o", device="cpu")


def test_in_memory_equals_disk(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from merge_engine.apply import InMemoryMerger

    text = """
merge_method: linear
models: [{{model: {base}, parameters: {{weight: 0.3}}}}, {{model: {med}, parameters: {{weight: 0.7}}}}]
tokenizer: {{source: union}}
"""
    out = merge(zoo, tmp_path, text)
    recipe = parse_recipe(yaml.safe_load(text.format(**{k: str(v) for k, v in zoo.items()})))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with InMemoryMerger(model, device="cpu") as merger:
        merger.apply(recipe)
    disk = load_state(out)
    mem = model.state_dict()
    for name, tensor in disk.items():
        assert torch.equal(mem[name], tensor), name


def test_same_vocabularies_need_no_row_plan(zoo):
    from contextlib import ExitStack

    from merge_engine.session import prepare

    text = "merge_method: linear\nmodels: [{{model: {med}}}, {{model: {med2}}}]\nparameters: {{weight: 1.0}}\ntokenizer: {{}}\n"
    recipe = parse_recipe(yaml.safe_load(text.format(**{k: str(v) for k, v in zoo.items()})))
    with ExitStack() as stack:
        plan = prepare(recipe, stack).plan
    assert plan.vocabulary is not None and plan.config["vocab_size"] == 101
    assert all(t.vocab is None for t in plan.targets)
