"""Tiny real multi-module (vision-language) checkpoints, saved with hub tensor names.

    make_tiny_vlm(path, kind, seed)                  a seeded random model of ``kind`` (VLM_KINDS)
    make_tiny_vlm(path, kind, seed, perturb_from=b)  b's weights + seeded noise (a "fine-tune")

Each is built with transformers from a small config, offline, in well under a second. Names are
those of the checkpoints on the hub (which mergekit 0.1.5's architecture files name): Qwen2-VL and
Qwen2.5-VL ``model.*`` / ``visual.*``, Qwen3-VL ``model.language_model.*`` /
``model.visual.*``, Mistral3 and Gemma3 ``language_model.*`` / ``vision_tower.*`` /
``multi_modal_projector.*`` (Gemma3's tower under ``vision_tower.vision_model.``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VLM_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3", "gemma3")


def _config(kind: str):
    import transformers as T

    text = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    if kind == "qwen2_vl":
        text.pop("head_dim")
        return T.Qwen2VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=3, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=1))
    if kind == "qwen2_5_vl":
        text.pop("head_dim")
        return T.Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=3, hidden_size=16, intermediate_size=32, out_hidden_size=32, num_heads=2,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=1,
                               fullatt_block_indexes=[2], window_size=8))
    if kind == "qwen3_vl":
        return T.Qwen3VLConfig(
            text_config=dict(text, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=3, hidden_size=16, intermediate_size=32, out_hidden_size=32, num_heads=2,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=1,
                               num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2]))
    if kind == "mistral3":
        return T.Mistral3Config(
            text_config=dict(text, model_type="mistral"),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                               num_attention_heads=2, head_dim=8, image_size=16, patch_size=4))
    if kind == "gemma3":
        return T.Gemma3Config(
            text_config=text, mm_tokens_per_image=4,
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                               image_size=16, patch_size=4, vision_use_head=False))
    raise ValueError(f"unknown kind {kind}; one of {VLM_KINDS}")


def _hub_name(kind: str, name: str) -> str:
    if kind == "gemma3" and name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def make_tiny_vlm(path: Path | str, kind: str, seed: int = 0, *, perturb_from: Path | str | None = None,
                  scale: float = 0.02) -> Path:
    """Save a tiny ``kind`` model (float32, one safetensors file) and its config to ``path``."""
    path = Path(path)
    if perturb_from is not None:
        base = load_file(Path(perturb_from) / "model.safetensors")
        gen = torch.Generator().manual_seed(seed)
        state = {n: t + scale * torch.randn(t.shape, generator=gen) for n, t in sorted(base.items())}
        path.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(perturb_from) / "config.json", path / "config.json")
    else:
        import transformers as T

        config = _config(kind)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T.AutoModelForImageTextToText.from_config(config)
        model.save_pretrained(path)
        raw = load_file(path / "model.safetensors")
        state = {_hub_name(kind, n): t.contiguous() for n, t in raw.items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path
