"""chat_template: the named formats, auto (most common among inputs), Jinja strings, bad values.

Every output is loaded back with transformers' AutoTokenizer and rendered with
apply_chat_template; the expected strings are written from the formats' descriptions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures import CHAT_TEMPLATE, make_tiny_llama
from merge_engine.chat_templates import NAMES, most_common, shipped_template
from merge_engine.errors import RecipeError
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe
from merge_engine.session import validate

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]

# the fixture tokenizer's BOS is <s> and its EOS </s>
EXPECTED = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               "<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "mistral": "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] 2+2? [/INST]",
    "alpaca": ("Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n"
               "### Instruction:\n2+2?\n\n### Response:\n"),
    "exaone": ("[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"
               "[|user|]2+2?\n[|assistant|]"),
}
# without a system message
EXPECTED_NO_SYSTEM = {
    "alpaca": "### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n### Response:\n",
    "exaone": ("[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"
               "[|user|]2+2?\n[|assistant|]"),
    "mistral": "<s> [INST] Hi there [/INST] Hello!</s> [INST] 2+2? [/INST]",
}


def _with_template(path: Path, seed: int, base: Path | None, template: str | None,
                   *, in_config: bool = False) -> Path:
    """A tiny model whose tokenizer ships ``template`` (None: no template), in chat_template.jinja
    or, with ``in_config``, inside tokenizer_config.json as older transformers saved it."""
    make_tiny_llama(path, seed, perturb_from=base)
    (path / "chat_template.jinja").unlink()
    if template is not None:
        if in_config:
            cfg = json.loads((path / "tokenizer_config.json").read_text())
            (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
        else:
            (path / "chat_template.jinja").write_text(template)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chatzoo")
    base = make_tiny_llama(root / "base", 0)  # ships the fixtures' CHAT_TEMPLATE
    return {
        "base": base,
        "chatml1": _with_template(root / "chatml1", 1, base, CHATML),
        "chatml2": _with_template(root / "chatml2", 2, base, CHATML + "\n", in_config=True),
        "other": _with_template(root / "other", 3, base, OTHER),
        "none": _with_template(root / "none", 4, base, None),
    }


def _merge(zoo, tmp_path, models, template, base="base", name="out") -> Path:
    data = {"merge_method": "task_arithmetic", "base_model": str(zoo[base]),
            "models": [{"model": str(zoo[m]), "parameters": {"weight": 0.5}} for m in models]}
    if template is not None:
        data["chat_template"] = template
    out = tmp_path / name
    run_merge(parse_recipe(data), out, device="cpu")
    return out


def _render(out: Path, chat=CHAT) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_every_named_template_renders_its_format(zoo, tmp_path):
    assert set(NAMES) == set(EXPECTED)
    for name in NAMES:
        out = _merge(zoo, tmp_path, ["chatml1"], name, name=name)
        assert _render(out) == EXPECTED[name], name
        if name in EXPECTED_NO_SYSTEM:
            assert _render(out, CHAT[1:]) == EXPECTED_NO_SYSTEM[name], name


def test_mistral_template_refuses_turns_out_of_order(zoo, tmp_path):
    out = _merge(zoo, tmp_path, ["chatml1"], "mistral")
    with pytest.raises(Exception, match="alternating"):
        _render(out, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_auto_takes_the_most_common_input_template(zoo, tmp_path):
    # base ships CHAT_TEMPLATE, two inputs ship chatml (one in tokenizer_config.json, with a
    # trailing newline: compared stripped), one ships another template and one none
    out = _merge(zoo, tmp_path, ["other", "chatml1", "none", "chatml2"], "auto")
    assert (out / "chat_template.jinja").read_text() == CHATML
    assert _render(out, CHAT[1:2]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_auto_tie_goes_to_the_first_listed_model_base_first(zoo, tmp_path):
    # one each of CHAT_TEMPLATE (base), OTHER, CHATML: the base's wins
    out = _merge(zoo, tmp_path, ["other", "chatml1"], "auto", name="tie1")
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    # without a template on the base, the first listed input's wins
    out = _merge(zoo, tmp_path, ["other", "chatml1"], "auto", base="none", name="tie2")
    assert (out / "chat_template.jinja").read_text() == OTHER.strip()
    assert most_common([None, "b", "a ", "a", "b"]) == "b"


def test_auto_without_any_input_template_keeps_the_tokenizer_sources(zoo, tmp_path):
    data = {"merge_method": "linear", "chat_template": "auto",
            "models": [{"model": str(zoo["none"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    run_merge(parse_recipe(data), out, device="cpu")
    assert shipped_template(out) is None
    assert not (out / "chat_template.jinja").exists()


def test_template_in_tokenizer_config_is_replaced_too(zoo, tmp_path):
    # the tokenizer source keeps its template inside tokenizer_config.json (older transformers
    # read only that one): the output must not carry the old template there
    out = _merge(zoo, tmp_path, ["chatml1"], "llama3", base="chatml2")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == (out / "chat_template.jinja").read_text()
    assert _render(out) == EXPECTED["llama3"]


def test_no_setting_keeps_the_tokenizer_sources_template(zoo, tmp_path):
    out = _merge(zoo, tmp_path, ["chatml1"], None)
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_jinja_string_is_used_as_given(zoo, tmp_path):
    out = _merge(zoo, tmp_path, ["chatml1"], OTHER)
    assert _render(out, CHAT[1:3]) == "[user] Hi there\n[assistant] Hello!\n"


@pytest.mark.parametrize("value, words", [
    ("vicuna", ["'vicuna' is not a known template", "chatml", "auto"]),
    ("{% for m in messages %}{{ m }}", ["not valid Jinja", "line 1"]),
])
def test_bad_settings_are_one_line_problems(zoo, tmp_path, value, words):
    data = {"merge_method": "linear", "chat_template": value,
            "models": [{"model": str(zoo["base"]), "parameters": {"weight": 1.0}}]}
    report = validate(parse_recipe(data))
    assert len(report.problems) == 1 and "\n" not in report.problems[0]
    for word in words:
        assert word in report.problems[0]
    with pytest.raises(RecipeError):
        run_merge(parse_recipe(data), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
