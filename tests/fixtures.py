"""Tiny real checkpoints for tests, built offline in well under a second each.

    make_tiny_llama(path, seed)                  LlamaForCausalLM + tokenizer (loads with Auto* classes)
    make_tiny_llama(path, seed, perturb_from=b)  a "fine-tune" of b: b's weights + seeded noise
    make_sharded(path, max_shard_size)           the same Llama saved as shards + index
    make_tiny_gpt2(path) / make_tiny_neox(path)  other layer layouts (transformer.h.N / gpt_neox.layers.N)
    load_state(path)                             every tensor of a saved model directory, by name
    use_hf_home(monkeypatch, home)               lm-eval's caches (HF_HOME, datasets') under home
    tiny_tokenizer(vocab)                        the char-level tokenizer the builders save
    make_vocab_variant(path, base, seed, ...)    a fine-tune of base with another vocabulary (order, added tokens)
    make_lora_adapter(path, base, seed, ...)     a real PEFT LoRA adapter of base (nonzero B), saved with peft

Import them as ``from fixtures import make_tiny_llama`` (tests/conftest.py puts tests/ on sys.path).

Every builder returns ``path``. Randomness is seeded and never touches the global torch RNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_llama(
    path: Path | str,
    seed: int = 0,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 128,
    intermediate: int = 128,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    perturb_from: Path | str | None = None,
    scale: float = 0.02,
    max_shard_size: int | str | None = None,
) -> Path:
    """Save a seeded random LlamaForCausalLM and a char-level tokenizer to ``path``.

    With ``perturb_from``, the model is that directory's model (its config wins over the size
    arguments) plus Gaussian noise of std ``scale`` drawn from ``seed``: models made this way
    share a base like real fine-tunes. ``dtype`` is the saved dtype; ``max_shard_size`` (bytes or
    "100KB") saves shards plus an index instead of one file.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if perturb_from is not None:
        config = LlamaConfig.from_pretrained(perturb_from)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=256,
            tie_word_embeddings=tie,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if perturb_from is not None:
        gen = torch.Generator().manual_seed(seed)
        noisy = {
            name: t.float() + scale * torch.randn(t.shape, generator=gen)
            for name, t in sorted(load_state(perturb_from).items())
        }
        missing, unexpected = model.load_state_dict(noisy, strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):
            raise ValueError(f"{perturb_from} does not match its config: missing {missing}, unexpected {unexpected}")
    return _save(model.to(dtype), path, max_shard_size, config.vocab_size)


def make_math_code_zoo(root: Path) -> Path:
    """A tiny base and two experts perturbed from it ("math", "code"), for search tests."""
    root = Path(root)
    make_tiny_llama(root / "base", 0)
    make_tiny_llama(root / "math", 1, perturb_from=root / "base", scale=0.05)
    make_tiny_llama(root / "code", 2, perturb_from=root / "base", scale=0.05)
    return root


def make_abc_zoo(root: Path) -> dict[str, Path]:
    """A tiny 3-layer base and three seeded fine-tunes of it, ``a``, ``b`` and ``c``: {name: folder}."""
    base = make_tiny_llama(root / "base", seed=0, num_layers=3, hidden=32, intermediate=64)
    zoo = {"base": base}
    for i, name in enumerate("abc", 1):
        zoo[name] = make_tiny_llama(root / name, seed=i, perturb_from=base)
    return zoo


def use_hf_home(mp: Any, home: Path) -> None:
    """Point lm-eval's caches at ``home`` through the monkeypatch ``mp``: ``HF_HOME`` and the
    datasets cache, which ``datasets`` read from the environment once, at its import."""
    import datasets.config

    mp.setenv("HF_HOME", str(home))
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", Path(home) / "datasets")


def require_vllm() -> None:
    """Skip the calling test when vLLM cannot be imported (not installed, or a torchvision that
    does not match the CPU torch, which raises more than ImportError)."""
    import pytest

    try:
        import vllm  # noqa: F401
    except Exception as err:
        pytest.skip(f"vllm cannot be imported here ({err.__class__.__name__}: {err})")


def make_sharded(path: Path | str, max_shard_size: int | str = "100KB", **llama_kwargs: Any) -> Path:
    """make_tiny_llama saved as shards of at most ``max_shard_size`` (the default gives 4 shards)."""
    return make_tiny_llama(path, max_shard_size=max_shard_size, **llama_kwargs)


def make_tiny_gpt2(
    path: Path | str, seed: int = 0, *, num_layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 128
) -> Path:
    """Save a seeded random GPT2LMHeadModel (tensors ``transformer.h.N.*``, tied ``wte``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=num_layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return _save(model, path, None, vocab)


def make_tiny_neox(
    path: Path | str, seed: int = 0, *, num_layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 128
) -> Path:
    """Save a seeded random GPTNeoXForCausalLM (tensors ``gpt_neox.layers.N.*``, ``embed_out``)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        vocab_size=vocab,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    return _save(model, path, None, vocab)


def load_state(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors model saved in ``path`` (single file or sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(path / "model.safetensors")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(path / shard))
    return state


def tiny_tokenizer(vocab: int = 128, *, reverse: bool = False, plain: tuple[str, ...] = (),
                   specials: tuple[str, ...] = ()) -> Any:  # a PreTrainedTokenizerFast (TokenizersBackend)
    """A char-level tokenizer: 4 specials (<pad>=0, <s>=1, </s>=2, <unk>=3) + printable ASCII, cut to ``vocab``.

    ``reverse`` lists the characters in reverse order; ``plain`` tokens follow them in the model's
    vocabulary; ``specials`` are added special tokens after those (ids in that order)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    table = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
    chars = [chr(code) for code in range(32, 127)][: max(0, vocab - len(table))]
    for text in (chars[::-1] if reverse else chars) + list(plain):
        table[text] = len(table)
    # BPE with no merges splits text into characters; Fuse joins them back on decode.
    core = Tokenizer(models.BPE(vocab=table, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    tok.chat_template = CHAT_TEMPLATE
    if specials:
        tok.add_tokens([AddedToken(text, special=True, normalized=False) for text in specials])
    return tok


def make_vocab_variant(path: Path | str, base: Path | str, seed: int, *, reverse: bool = False,
                       plain: tuple[str, ...] = (), specials: tuple[str, ...] = (), scale: float = 0.02) -> Path:
    """A "fine-tune" of the tiny Llama in ``base`` with another vocabulary (see tiny_tokenizer's
    ``reverse``/``plain``/``specials``): every tensor is base's plus seeded noise of std
    ``scale``; each embedding/head row of a token base has is base's row of that token (+ noise),
    rows of new tokens are random. ``vocab_size`` is the tokenizer's length."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base_vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    config = LlamaConfig.from_pretrained(base)
    tok = tiny_tokenizer(config.vocab_size, reverse=reverse, plain=plain, specials=specials)
    vocab = tok.get_vocab()
    config.vocab_size = len(vocab)
    gen = torch.Generator().manual_seed(seed)
    state = {name: t.float() + scale * torch.randn(t.shape, generator=gen)
             for name, t in sorted(load_state(base).items())}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            old = state[name]
            new = 0.02 * torch.randn((len(vocab), old.shape[1]), generator=gen)
            for text, i in vocab.items():
                if text in base_vocab:
                    new[i] = old[base_vocab[text]]
            state[name] = new
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_lora_adapter(path: Path | str, base: Path | str, seed: int = 0, *, r: int = 4, alpha: float = 8,
                      targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
                      modules_to_save: tuple[str, ...] = (), **lora_kwargs: Any) -> Path:
    """Save a PEFT LoRA adapter of the model in ``base`` to ``path`` (adapter_config.json +
    adapter_model.safetensors), as ``PeftModel.save_pretrained`` writes it. Every A and B is
    seeded noise of std 0.1 (peft's default init leaves B zero, which would hide the update);
    ``modules_to_save`` copies get seeded noise too. ``lora_kwargs`` go to ``LoraConfig``
    (``use_rslora``, ``fan_in_fan_out``, ``alpha_pattern``, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                        modules_to_save=list(modules_to_save) or None, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    path = Path(path)
    peft_model.save_pretrained(path)
    return path


# -- internals ---------------------------------------------------------------------------------


def _save(model: torch.nn.Module, path: Path | str, max_shard_size: int | str | None, vocab: int) -> Path:
    path = Path(path)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


def make_tied_llama_storing_head(path: Path | str, seed: int = 0, *, head_scale: float = 0.5, **llama_kwargs: Any) -> Path:
    """A LlamaForCausalLM whose config ties the embeddings (``tie_word_embeddings=True``) but whose
    checkpoint stores both ``model.embed_tokens.weight`` and a *different* ``lm_head.weight``
    (embedding + noise of std ``head_scale``), as some hub checkpoints do."""
    from safetensors.torch import save_file

    path = make_tiny_llama(path, seed, tie=True, **llama_kwargs)
    state = load_state(path)
    embed = state["model.embed_tokens.weight"]
    noise = torch.randn(embed.shape, generator=torch.Generator().manual_seed(seed + 1000))
    state["lm_head.weight"] = (embed.float() + head_scale * noise).to(embed.dtype)
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path
