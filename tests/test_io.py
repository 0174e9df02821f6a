"""merge_engine.io: model resolution, checkpoint reading, layer layout, sharded writing."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import load_state, make_sharded, make_tiny_gpt2, make_tiny_llama, make_tiny_neox

from merge_engine.errors import CheckpointError, MergeError, OutputExistsError
from merge_engine.io import writer as writer_mod
from merge_engine.layout import (
    StaticInfo,
    check_compatible,
    detect_layout,
    is_embedding_name,
    num_layers_from_config,
    with_num_layers,
)
from merge_engine.io.reader import CheckpointReader
from merge_engine.io.refs import ModelRef
from merge_engine.io.resolve import resolve_model_dir
from merge_engine.io.stream import PlannedTensor
from merge_engine.io.writer import OutputWriter, model_card, tokenizer_files

# -- shared tiny models (built once per session; tests that damage a model copy it first) ----------


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_llama(root / "llama")
    return {
        "llama": base,
        "tuned": make_tiny_llama(root / "tuned", seed=1, perturb_from=base),
        "tied": make_tiny_llama(root / "tied", tie=True, dtype=torch.bfloat16),
        "sharded": make_sharded(root / "sharded", "100KB"),
        "gpt2": make_tiny_gpt2(root / "gpt2"),
        "neox": make_tiny_neox(root / "neox"),
    }


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


# -- fixtures --------------------------------------------------------------------------------------


def test_fixtures_are_seeded_and_finetunes_share_the_base(models: dict[str, Path], tmp_path: Path) -> None:
    again = load_state(make_tiny_llama(tmp_path / "again"))
    base, tuned = load_state(models["llama"]), load_state(models["tuned"])
    assert all(torch.equal(again[k], base[k]) for k in base)
    delta = torch.cat([(tuned[k] - base[k]).flatten() for k in base])
    assert 0.015 < float(delta.std()) < 0.025  # the requested noise scale, 0.02
    sharded = load_state(models["sharded"])
    assert len(json.loads((models["sharded"] / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    assert all(torch.equal(sharded[k], base[k]) for k in base)


def test_fixture_tokenizer_and_model_load_offline(models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["tuned"])
    ids = tok("hi there", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "hi there" and tok.pad_token_id == 0 and tok.eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(models["tuned"])
    assert model(ids).logits.shape == (1, ids.shape[1], 128)


# -- resolve ---------------------------------------------------------------------------------------


def fake_hub_cache(cache: Path, repo_id: str, src: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay ``src`` out the way huggingface_hub caches a snapshot: blobs + symlinked snapshot files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in tmp with HF_HUB_OFFLINE=1 (huggingface_hub reads env at import: patch both)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_resolve_local_directory_as_is(models: dict[str, Path]) -> None:
    assert resolve_model_dir(ModelRef(str(models["llama"]))) == models["llama"]


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("/no/such/model", "does not exist; check the path"),
        ("./missing-model", "does not exist; check the path"),
        ("~/missing-model-xyz", "does not exist; check the path"),
        ("/no/such/model+./adapters/lora", "adapter of /no/such/model: model directory adapters/lora does not exist"),
    ],
)
def test_resolve_refuses(ref: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        resolve_model_dir(ModelRef.parse(ref))


def test_resolve_refuses_file_and_revision_on_local_dir(models: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_dir(ModelRef(str(models["llama"] / "config.json")))
    with pytest.raises(CheckpointError, match="has no revisions"):
        resolve_model_dir(ModelRef(str(models["llama"]), revision="v1"))


def test_resolve_hub_id_from_offline_cache(models: dict[str, Path], offline_hub: Path) -> None:
    commit = "a" * 40
    snapshot = fake_hub_cache(offline_hub, "tiny-org/sharded", models["sharded"], commit)
    resolved = resolve_model_dir(ModelRef.parse("tiny-org/sharded"))
    assert resolved == snapshot
    # Hub-cache shards are symlinks into ../../blobs: the reader must accept them.
    with CheckpointReader(resolved, name="tiny-org/sharded") as reader:
        base = load_state(models["sharded"])
        assert reader.tensor_names == tuple(sorted(base))
        assert torch.equal(reader.get("model.norm.weight"), base["model.norm.weight"])
    # A pinned commit needs no ref file; an explicit cache_dir works too.
    fake_hub_cache(offline_hub / "other", "tiny-org/llama", models["llama"], "b" * 40, ref=None)
    ref = ModelRef.parse("tiny-org/llama@" + "b" * 40)
    assert resolve_model_dir(ref, cache_dir=offline_hub / "other").name == "b" * 40


def test_resolve_hub_id_missing_offline(offline_hub: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a local directory nor in the hub cache, and HF_HUB_OFFLINE is set.*hf download"):
        resolve_model_dir(ModelRef.parse("tiny-org/not-cached"))
    with pytest.raises(CheckpointError, match="neither an existing local directory nor a valid hub repo id"):
        resolve_model_dir(ModelRef.parse("too/many/slashes"))


# -- reader ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["mmap", "mmap-touching-pages", "pread", "mmap-refused"])
@pytest.mark.parametrize("which", ["llama", "sharded"])
def test_reader_matches_saved_tensors(models: dict[str, Path], which: str, read: str,
                                      monkeypatch) -> None:
    """Every way the reader gets bytes gives the saved tensors: a populated mapping, a mapping
    touched page by page (kernels without MADV_POPULATE_READ), pread (no mmap), and pread after
    the kernel refuses a mapping."""
    from merge_engine.io import reader as reader_module

    if read == "pread":
        monkeypatch.setattr(reader_module, "_CAN_MAP", False)
    if read == "mmap-touching-pages":
        monkeypatch.setattr(reader_module, "_MADV_POPULATE_READ", None)
    if read == "mmap-refused":  # out of mappings (vm.max_map_count): pread instead
        def refuse(*args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(reader_module.mmap, "mmap", refuse)
    state = load_state(models[which])
    with CheckpointReader(models[which]) as reader:
        assert reader.tensor_names == tuple(sorted(state))
        assert reader.config["num_hidden_layers"] == 2
        for name, tensor in state.items():
            assert reader.shape(name) == tuple(tensor.shape)
            assert reader.dtype(name) == tensor.dtype
            assert reader.nbytes(name) == tensor.nbytes
            assert torch.equal(reader.get(name), tensor)
        half = reader.get("lm_head.weight", device="cpu", dtype=torch.float16)
        assert half.dtype == torch.float16 and torch.equal(half, state["lm_head.weight"].half())


def test_reader_hands_out_owned_tensors(models: dict[str, Path]) -> None:
    """Tensors are copy-on-write mappings of the file: writing to one changes neither the file
    nor later reads."""
    import hashlib

    files = sorted(models["tied"].glob("*.safetensors"))
    digest = lambda: [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]  # noqa: E731
    before = digest()
    with CheckpointReader(models["tied"]) as reader:
        assert reader.dtype("model.norm.weight") == torch.bfloat16
        first = reader.get("model.norm.weight")
        first.add_(100)
        assert torch.all(reader.get("model.norm.weight") < 50)
        for name in reader.tensor_names:
            reader.get(name).zero_()
    assert digest() == before
    with CheckpointReader(models["tied"]) as reader:
        with pytest.raises(CheckpointError, match="has no tensor 'nope'"):
            reader.get("nope")
    with pytest.raises(CheckpointError, match="is closed"):
        reader.get("model.norm.weight")


def test_reader_concurrent_gets(models: dict[str, Path]) -> None:
    state = load_state(models["sharded"])
    with CheckpointReader(models["sharded"]) as reader:
        results: dict[str, bool] = {}

        def read(names: list[str]) -> None:
            for n in names:
                results[n] = torch.equal(reader.get(n), state[n])

        names = sorted(state)
        threads = [threading.Thread(target=read, args=(names[i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == len(names) and all(results.values())


def test_reader_missing_config(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["llama"], tmp_path / "m")
    (model / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        CheckpointReader(model)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")


def test_reader_remote_code_needs_opt_in(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["llama"], tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="auto_map.*trust_remote_code"):
        CheckpointReader(model)
    with CheckpointReader(model, trust_remote_code=True) as reader:
        assert "auto_map" in reader.config


def test_reader_pickle_needs_opt_in(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["llama"], tmp_path / "m")
    state = load_state(model)
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weights.*allow_pickle"):
        CheckpointReader(model)
    with CheckpointReader(model, allow_pickle=True) as reader:
        assert reader.tensor_names == tuple(sorted(state))
        assert torch.equal(reader.get("lm_head.weight"), state["lm_head.weight"])
        assert reader.shape("lm_head.weight") == (128, 64)


def test_reader_no_weights(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["llama"], tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        CheckpointReader(model)


def test_reader_truncated_file(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["llama"], tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="is truncated: tensor .* needs data up to byte"):
        CheckpointReader(model)
    weights.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="is truncated"):
        CheckpointReader(model)


def test_reader_header_claims_more_than_the_file(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["llama"], tmp_path / "m")
    weights = model / "model.safetensors"

    def grow_last(header: dict) -> None:
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        header[name]["shape"][0] *= 4
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin, begin + 4 * (end - begin)]

    rewrite_header(weights, grow_last)
    with pytest.raises(CheckpointError, match="is truncated: tensor .* re-download"):
        CheckpointReader(model)
    # A header length field pointing past the end of the file.
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(CheckpointError, match="header needs .* bytes but the file has"):
        CheckpointReader(model)


def test_reader_header_size_mismatch(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["llama"], tmp_path / "m")
    rewrite_header(model / "model.safetensors", lambda h: h["model.norm.weight"]["shape"].__setitem__(0, 32))
    with pytest.raises(CheckpointError, match="corrupt header: tensor model.norm.weight spans"):
        CheckpointReader(model)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_reader_index_path_traversal(models: dict[str, Path], tmp_path: Path, bad: str) -> None:
    model = copy_model(models["sharded"], tmp_path / "m")
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = bad
    index_path.write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes((model / "model-00001-of-00004.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="outside the model directory"):
        CheckpointReader(model)


def test_reader_index_missing_shard_and_tensor(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models["sharded"], tmp_path / "m")
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["lm_head.weight"]
    (model / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shard files that do not exist \\({shard}"):
        CheckpointReader(model)

    model = copy_model(models["sharded"], tmp_path / "m2")
    index["weight_map"]["model.layers.9.extra.weight"] = "model-00001-of-00004.safetensors"
    index_path = model / "model.safetensors.index.json"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.9.extra.weight is listed in the shard index but missing"):
        CheckpointReader(model)


# -- layout ----------------------------------------------------------------------------------------


def test_layout_tiny_llama(models: dict[str, Path]) -> None:
    with CheckpointReader(models["llama"]) as reader:
        layout = detect_layout(reader.tensor_names, reader.config)
    assert (layout.prefix, layout.num_layers) == ("model.layers.", 2)
    assert len(layout.suffixes) == 9 and "self_attn.q_proj.weight" in layout.suffixes
    assert layout.layer_of("model.layers.1.mlp.up_proj.weight") == 1
    assert layout.layer_of("model.norm.weight") is None
    assert layout.layer_of("model.layers.7.mlp.up_proj.weight") == 7  # past the stack: stacked outputs
    assert layout.layer_of("model.layers.x.w") is None and layout.layer_of("model.layers.3") is None
    assert layout.rename("model.layers.1.mlp.up_proj.weight", 0) == "model.layers.0.mlp.up_proj.weight"
    assert layout.suffix_of("model.layers.1.mlp.up_proj.weight") == "mlp.up_proj.weight"
    with pytest.raises(ValueError):
        layout.rename("model.norm.weight", 0)
    assert layout.is_embedding("model.embed_tokens.weight") and layout.is_embedding("lm_head.weight")
    assert not layout.is_embedding("model.norm.weight")


def test_layout_tiny_gpt2_and_neox(models: dict[str, Path]) -> None:
    with CheckpointReader(models["gpt2"]) as reader:
        gpt2 = detect_layout(reader.tensor_names, reader.config)
    assert (gpt2.prefix, gpt2.num_layers) == ("transformer.h.", 2)
    assert gpt2.is_embedding("transformer.wte.weight") and not gpt2.is_embedding("transformer.wpe.weight")
    assert "attn.c_attn.weight" in gpt2.suffixes
    with CheckpointReader(models["neox"]) as reader:
        neox = detect_layout(reader.tensor_names, reader.config)
    assert (neox.prefix, neox.num_layers) == ("gpt_neox.layers.", 2)
    assert neox.is_embedding("gpt_neox.embed_in.weight") and neox.is_embedding("embed_out.weight")
    assert neox.rename("gpt_neox.layers.0.attention.dense.bias", 1) == "gpt_neox.layers.1.attention.dense.bias"


def names(prefix: str, n: int, suffixes: list[str], outer: list[str]) -> list[str]:
    return outer + [f"{prefix}{i}.{s}" for i in range(n) for s in suffixes]


ATTN = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]
LLAMA_OUTER = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


@pytest.mark.parametrize(
    ("arch", "tensor_names", "config", "prefix", "n", "tied"),
    [
        ("mistral", names("model.layers.", 32, ATTN + MLP + NORMS, LLAMA_OUTER), {"num_hidden_layers": 32}, "model.layers.", 32, False),
        ("qwen2", names("model.layers.", 24, ATTN + [a.replace("weight", "bias") for a in ATTN[:3]] + MLP + NORMS, LLAMA_OUTER[:2]),
         {"num_hidden_layers": 24, "tie_word_embeddings": True}, "model.layers.", 24, True),
        ("qwen3", names("model.layers.", 28, ATTN + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] + MLP + NORMS, LLAMA_OUTER),
         {"num_hidden_layers": 28}, "model.layers.", 28, False),
        ("gemma2", names("model.layers.", 26, ATTN + MLP + NORMS + ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"], LLAMA_OUTER[:2]),
         {"num_hidden_layers": 26}, "model.layers.", 26, True),
        ("phi3", names("model.layers.", 32, ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"] + NORMS, LLAMA_OUTER),
         {"num_hidden_layers": 32}, "model.layers.", 32, False),
        ("gpt2-bare", names("h.", 12, ["attn.c_attn.weight", "mlp.c_fc.weight", "ln_1.weight"], ["wte.weight", "wpe.weight", "ln_f.weight"]),
         {"n_layer": 12}, "h.", 12, True),
        ("mixtral", names("model.layers.", 4, ATTN + NORMS + [f"block_sparse_moe.experts.{e}.w{k}.weight" for e in range(8) for k in (1, 2, 3)], LLAMA_OUTER),
         {"num_hidden_layers": 4}, "model.layers.", 4, False),
        ("gemma3-vlm", names("language_model.model.layers.", 4, ATTN + MLP, ["language_model.model.embed_tokens.weight"])
         + names("vision_tower.vision_model.encoder.layers.", 3, ["self_attn.q_proj.weight"], []),
         {"text_config": {"num_hidden_layers": 4}}, "language_model.model.layers.", 4, True),
        ("no-config", names("model.layers.", 3, ATTN, LLAMA_OUTER), {}, "model.layers.", 3, False),
    ],
)  # fmt: skip
def test_layout_from_names(arch: str, tensor_names: list[str], config: dict, prefix: str, n: int, tied: bool) -> None:
    layout = detect_layout(reversed(tensor_names), config)
    assert (layout.prefix, layout.num_layers) == (prefix, n), arch
    assert layout.layer_of(f"{prefix}{n - 1}.self_attn.q_proj.weight") in (n - 1, None)


def test_layout_config_disagrees_and_no_stack() -> None:
    with pytest.raises(CheckpointError, match="declares 4 layers but the tensor names show model.layers.<i> x3"):
        detect_layout(names("model.layers.", 3, ATTN, LLAMA_OUTER), {"num_hidden_layers": 4})
    with pytest.raises(CheckpointError, match="declares 2 layers"):  # a gap: indices 0, 2
        detect_layout(["model.layers.0.w", "model.layers.2.w"], {"num_hidden_layers": 2})
    flat = detect_layout(["embed.weight", "head.weight"], {})
    assert flat.num_layers == 0 and flat.layer_of("embed.weight") is None


def test_num_layers_from_config() -> None:
    assert num_layers_from_config({"num_hidden_layers": 4}) == 4
    assert num_layers_from_config({"n_layer": 12}) == 12
    assert num_layers_from_config({"num_layers": 6}) == 6
    assert num_layers_from_config({"text_config": {"num_hidden_layers": 8}}) == 8
    assert num_layers_from_config({"hidden_size": 8}) is None


def test_is_embedding_name() -> None:
    for name in ["model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
                 "lm_head.weight", "embed_out.weight", "bert.embeddings.word_embeddings.weight"]:  # fmt: skip
        assert is_embedding_name(name), name
    for name in ["model.norm.weight", "transformer.wpe.weight", "model.layers.0.mlp.up_proj.weight"]:
        assert not is_embedding_name(name), name


# -- compatibility ---------------------------------------------------------------------------------


def info(path: Path) -> CheckpointReader:
    return CheckpointReader(path)


def test_check_compatible_real_models(models: dict[str, Path], tmp_path: Path) -> None:
    llama, tuned, gpt2 = info(models["llama"]), info(models["tuned"]), info(models["gpt2"])
    assert check_compatible({"base": llama, "tuned": tuned}) == []
    problems = check_compatible({"base": llama, "gpt2": gpt2})
    assert any("model gpt2 is GPT2LMHeadModel but model base is LlamaForCausalLM" in p for p in problems)
    wide = info(make_tiny_llama(tmp_path / "wide", hidden=128))
    problems = check_compatible({"base": llama, "wide": wide})
    assert any(p.startswith("tensor model.layers.0.") and "in model wide" in p and "(in 2 layers)" in p for p in problems)
    assert any("tensor model.norm.weight has shape [128] in model wide but [64] in model base" in p for p in problems)


def test_check_compatible_allows_vocab_depth_and_tying_differences(models: dict[str, Path], tmp_path: Path) -> None:
    bigger_vocab = info(make_tiny_llama(tmp_path / "v", vocab=160))
    deeper = info(make_tiny_llama(tmp_path / "d", num_layers=4))
    tied = info(models["tied"])
    assert check_compatible({"base": info(models["llama"]), "v": bigger_vocab, "d": deeper, "t": tied}) == []


def test_check_compatible_static_names() -> None:
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}
    shapes = {n: (4, 4) for n in names("model.layers.", 2, ATTN, LLAMA_OUTER)}
    other = dict(shapes)
    del other["model.layers.0.self_attn.q_proj.weight"], other["model.layers.1.self_attn.q_proj.weight"]
    other.update({"model.layers.0.self_attn.qkv.weight": (4, 4), "model.layers.1.self_attn.qkv.weight": (4, 4)})
    problems = check_compatible({"a": StaticInfo(config, shapes), "b": StaticInfo(config, other)})
    assert len(problems) == 1 and "model b has different per-layer tensors than model a" in problems[0]
    assert "self_attn.qkv.weight" in problems[0] and "self_attn.q_proj.weight" in problems[0]
    broken = check_compatible({"a": StaticInfo(config, shapes), "c": StaticInfo({"num_hidden_layers": 5}, shapes)})
    assert broken and broken[0].startswith("model c: config.json declares 5 layers")


# -- writer ----------------------------------------------------------------------------------------


def tensors(n: int, numel: int = 256) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.w": torch.randn(numel, generator=gen) for i in range(n)}


def planned(w: OutputWriter, data: dict[str, torch.Tensor]) -> None:
    w.plan([PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in data.items()])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_writer_sharded_publish_round_trips(tmp_path: Path) -> None:
    data = tensors(5)  # 1 KiB each
    out = tmp_path / "merged"
    with OutputWriter(out, shard_size=2048) as w:
        planned(w, data)
        for name, t in data.items():
            w.add(name, t)
        w.write_json("config.json", {"num_hidden_layers": 5})
        assert not out.exists()
        assert w.publish() == out
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert index["weight_map"]["model.layers.4.w"] == "model-00003-of-00003.safetensors"
    with CheckpointReader(out) as reader:
        assert all(torch.equal(reader.get(n), t) for n, t in data.items())
    assert leftovers(tmp_path) == []


def test_writer_single_shard_and_odd_tensors(tmp_path: Path) -> None:
    embed = torch.arange(12.0).reshape(3, 4)
    with OutputWriter(tmp_path / "out") as w:
        planned(w, {"embed": embed, "head": embed, "col": embed[:, 1], "half": embed.to(torch.bfloat16)})
        w.add("embed", embed)
        w.add("head", embed)  # tied: same storage twice
        w.add("col", embed[:, 1])  # non-contiguous view
        w.add("half", embed.to(torch.bfloat16))
        with pytest.raises(ValueError, match="already added"):
            w.add("embed", embed)
        w.publish()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    state = load_state(tmp_path / "out")
    assert torch.equal(state["head"], embed) and torch.equal(state["col"], embed[:, 1])
    assert state["half"].dtype == torch.bfloat16


def test_writer_refuses_existing_output_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match=f"output directory {out} exists; pass --force to replace it"):
        OutputWriter(out)
    with OutputWriter(out, force=True) as w:
        planned(w, {"x": torch.ones(2)})
        w.add("x", torch.ones(2))
        w.write_text("README.md", "# hi\n")
        assert (out / "old.txt").exists()  # untouched until publish
        w.publish()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    assert leftovers(tmp_path) == []


def test_writer_aborts_on_exception_and_without_publish(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with OutputWriter(tmp_path / "out", shard_size=64) as w:
            planned(w, tensors(4))
            for name, t in tensors(4).items():
                w.add(name, t)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with OutputWriter(tmp_path / "out") as w:
        planned(w, {"x": torch.ones(2)})
        w.add("x", torch.ones(2))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MergeError, match="already aborted"):
        w.add("y", torch.ones(2))
    with OutputWriter(tmp_path / "empty") as w, pytest.raises(MergeError, match="no tensors were added"):
        w.publish()
    assert list(tmp_path.iterdir()) == []


def test_writer_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod.ShardStream, "write", full)
    out = tmp_path / "out"
    w = OutputWriter(out, shard_size=1024)
    planned(w, tensors(20))
    with pytest.raises(MergeError, match=f"disk full while writing {out}; free space or choose another --out"):
        for name, t in tensors(20).items():
            w.add(name, t)
        w.publish()
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(type(out), "write_text", lambda *a, **k: full())
    with OutputWriter(out) as w, pytest.raises(MergeError, match="disk full"):
        w.write_json("config.json", {})
    assert list(tmp_path.iterdir()) == []


def test_writer_other_thread_errors_reach_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("serialiser bug")

    monkeypatch.setattr(writer_mod.ShardStream, "write", broken)
    w = OutputWriter(tmp_path / "out", shard_size=1024)
    planned(w, {"a": torch.ones(512)})
    w.add("a", torch.ones(512))
    with pytest.raises(ValueError, match="serialiser bug"):
        w.publish()
    assert list(tmp_path.iterdir()) == []


def test_writer_streams_in_background_with_bounded_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    writer_threads: set[str] = set()
    real_write = writer_mod.ShardStream.write

    def slow_write(self: object, name: str, tensor: torch.Tensor) -> None:
        writer_threads.add(threading.current_thread().name)
        release.wait(10)
        real_write(self, name, tensor)

    monkeypatch.setattr(writer_mod.ShardStream, "write", slow_write)
    data = tensors(8)
    added: list[str] = []
    w = OutputWriter(tmp_path / "out", shard_size=1024)
    w.plan([PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in data.items()], max_pending_tensors=2)

    def produce() -> None:
        for name, t in data.items():
            w.add(name, t)
            added.append(name)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 5
    while len(added) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # 2 tensors handed off (1 being written, 1 queued): the 3rd add waits for room.
    assert len(added) == 2
    release.set()
    producer.join(10)
    w.publish()
    assert writer_threads == {w._thread.name} and "MainThread" not in writer_threads
    assert len(load_state(tmp_path / "out")) == 8


def test_writer_file_names_are_checked(tmp_path: Path) -> None:
    with OutputWriter(tmp_path / "out") as w:
        for bad in ["../x.json", "/abs.json", "model.safetensors", "model.safetensors.index.json"]:
            with pytest.raises(ValueError):
                w.write_text(bad, "")
        with pytest.raises(CheckpointError, match="does not exist"):
            w.copy_files(tmp_path, ["tokenizer.json"])


def test_tokenizer_files_and_copy(models: dict[str, Path], tmp_path: Path) -> None:
    names_ = tokenizer_files(models["llama"])
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(names_)
    assert "config.json" not in names_ and "model.safetensors" not in names_
    with OutputWriter(tmp_path / "out") as w:
        planned(w, {"x": torch.ones(1)})
        w.add("x", torch.ones(1))
        w.copy_files(models["llama"], names_)
        w.publish()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out").decode([44, 73]) == "He"


def test_model_card() -> None:
    recipe = "merge_method: ties\nbase_model: org/base\n# a ```fenced``` comment\n"
    card = model_card(recipe, ["org/base", "org/tuned: v2"], "ties")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["tags"] == ["merge", "evomerge"] and meta["base_model"] == ["org/base", "org/tuned: v2"]
    assert "`ties`" in body and "- `org/tuned: v2`" in body
    assert "````yaml\n" + recipe.rstrip() + "\n````" in body


def test_check_compatible_accepts_plain_tuples(models: dict[str, Path]) -> None:
    with CheckpointReader(models["llama"]) as a, CheckpointReader(models["gpt2"]) as b:
        as_tuples = {
            key: (r.tensor_names, r.config, {n: r.shape(n) for n in r.tensor_names}) for key, r in (("a", a), ("b", b))
        }
        assert check_compatible(as_tuples) == check_compatible({"a": a, "b": b}) != []


def test_with_num_layers_rewrites_every_layer_key() -> None:
    gpt2 = {"n_layer": 12, "n_embd": 8}
    assert with_num_layers(gpt2, 4) == {"n_layer": 4, "n_embd": 8} and gpt2["n_layer"] == 12
    assert with_num_layers({"n_layers": 6, "dim": 8}, 2) == {"n_layers": 2, "dim": 8}
    vlm = {"text_config": {"num_hidden_layers": 4, "hidden_size": 8}, "vision_config": {"num_hidden_layers": 3}}
    out = with_num_layers(vlm, 2)
    assert out["text_config"] == {"num_hidden_layers": 2, "hidden_size": 8}
    assert out["vision_config"] == {"num_hidden_layers": 3} and vlm["text_config"]["num_hidden_layers"] == 4
    assert num_layers_from_config(out) == 2
