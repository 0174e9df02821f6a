"""`evomerge moe` refuses bad input in one line, before any tensor is read or any file written."""

from __future__ import annotations

import pytest
import torch
import yaml
from fixtures import make_tiny_gpt2, make_tiny_llama

from evomerge.cli import main
from merge_engine.io.reader import CheckpointReader


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_bad")
    base = make_tiny_llama(root / "base", 0)
    return {"root": root, "base": base, "a": make_tiny_llama(root / "a", 1, perturb_from=base),
            "b": make_tiny_llama(root / "b", 2, perturb_from=base),
            "wide": make_tiny_llama(root / "wide", 3, hidden=32, heads=2),
            "gpt2": make_tiny_gpt2(root / "gpt2")}


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(self, name, *args, **kwargs):
        raise AssertionError(f"tensor {name} was read before the input was checked")
    monkeypatch.setattr(CheckpointReader, "get", refuse)


def run(tmp_path, capsys, config, *extra):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(["moe", str(path), str(tmp_path / "out"), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def config(zoo, *experts, **extra):
    experts = experts or ("a", "b")
    data = {"base_model": str(zoo["base"]),
            "experts": [{"source_model": str(zoo[e]), "positive_prompts": [f"about {e} {i}"]}
                        for i, e in enumerate(experts)]}
    data.update(extra)
    return data


@pytest.mark.parametrize("experts, extra, message", [
    (("a", "gpt2"), {}, "different architectures (gpt2, llama)"),
    (("a", "wide"), {}, "has shape [128, 32] in model experts[1]"),
    (("a", "b"), {"experts_per_token": 3}, "experts_per_token: 3 is more than the 2 experts"),
    (("a", "b"), {"gate_mode": "hiddn"}, "gate_mode: 'hiddn' is unknown; use one of hidden,"),
    (("a", "a"), {}, "every expert is the same model"),
    (("a", "b"), {"architecture": "qwen"}, "Qwen MoE output takes exactly 1 shared expert"),
    (("a", "b"), {"architecture": "gpt"}, "architecture: 'gpt' names no output architecture"),
])
def test_bad_input_is_one_line_before_any_read(zoo, tmp_path, capsys, no_tensor_reads, experts, extra, message):
    code, err = run(tmp_path, capsys, config(zoo, *experts, **extra))
    assert code == 2
    assert message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == [tmp_path / "moe.yaml"]  # nothing written, no temp folder left


def test_identical_prompts_and_missing_prompts_are_refused(zoo, tmp_path, capsys, no_tensor_reads):
    data = config(zoo)
    for e in data["experts"]:
        e["positive_prompts"] = ["same"]
    code, err = run(tmp_path, capsys, data)
    assert code == 2 and "every expert has the same prompts" in err
    del data["experts"][0]["positive_prompts"]
    code, err = run(tmp_path, capsys, data)
    assert code == 2 and "experts[0]: no positive_prompts" in err


def test_prompts_that_tokenize_to_nothing(zoo, tmp_path, capsys, no_tensor_reads):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    base = make_tiny_llama(tmp_path / "strip", 0)
    tok = AutoTokenizer.from_pretrained(base)
    tok.backend_tokenizer.normalizer = normalizers.Strip()  # whitespace-only text is nothing to it
    tok.save_pretrained(base)
    data = config(zoo, base_model=str(base))
    data["experts"][0]["negative_prompts"] = ["   "]
    data["experts"][1]["positive_prompts"] = [""]
    (tmp_path / "out").mkdir()  # an existing output: the prompts are still checked first
    code, err = run(tmp_path, capsys, data)
    assert code == 2 and "\n" not in err
    assert "experts[0].negative_prompts: '   ' tokenizes to no tokens" in err
    assert "experts[1].positive_prompts: '' tokenizes to no tokens" in err


def test_existing_output_is_kept_and_dry_run_writes_nothing(zoo, tmp_path, capsys):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config(zoo)))
    assert main(["moe", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "valid; would write a Mixtral model of" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert main(["moe", str(path), str(tmp_path / "out")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert main(["moe", str(path), str(tmp_path / "out"), "--force", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "mine.txt").exists()


def test_hidden_states_run_on_the_requested_device_and_a_failure_leaves_nothing(zoo, tmp_path, monkeypatch):
    from merge_engine.moe import build, build_moe, parse_moe_config, router

    class FakeCudaHiddenStates(router.HiddenStates):
        """The real class up to loading the base model on a GPU this machine lacks: records the
        device and dtype asked for, then fails as a model that does not fit would."""

        seen: list = []

        def _load(self):
            self.seen.append((self.device, self.dtype))
            raise RuntimeError("CUDA out of memory (fake)")

    monkeypatch.setattr(build, "pick_device", lambda name: torch.device("cuda", 1) if name == "cuda:1" else None)
    monkeypatch.setattr(router, "HiddenStates", FakeCudaHiddenStates)
    with pytest.raises(RuntimeError, match="fake"):
        build_moe(parse_moe_config(config(zoo)), tmp_path / "out", device="cuda:1", router_dtype="float16")
    assert FakeCudaHiddenStates.seen == [(torch.device("cuda", 1), torch.float16)]
    assert list(tmp_path.iterdir()) == []  # the temporary output folder is gone too


def test_attention_biases_the_output_cannot_hold(tmp_path, capsys, no_tensor_reads):
    from fixtures import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, attention_bias=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "biased")
    tiny_tokenizer().save_pretrained(tmp_path / "biased")
    data = {"base_model": str(tmp_path / "biased"), "gate_mode": "random", "experts_per_token": 1,
            "experts": [{"source_model": str(tmp_path / "biased")}]}
    code, err = run(tmp_path, capsys, data)
    assert code == 2 and "has biases self_attn.k_proj.bias, self_attn.o_proj.bias" in err
    assert "which Mixtral output cannot hold" in err
