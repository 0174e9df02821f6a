"""The candidate: one resident model that each merge recipe is written into, in place.

Both the search (one candidate per trial) and the ablation grids (one per table row) hold one
model in memory and turn it into each merge without writing to disk:

    with Candidate.load(model_dir, dtype="bfloat16", device="cpu") as cand:
        for recipe in recipes:
            cand.apply(recipe)                     # only tensors whose recipe changed are rewritten
            evaluator.evaluate(cand.model, cand.tokenizer)

Lifecycle: :meth:`Candidate.load` once (reads the model and tokenizer from a local directory onto
``device``); :meth:`apply` once per candidate; :meth:`close` at the end (also via ``with``). The
applied model equals, bit for bit, the on-disk merge of the same recipe loaded in the same dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_engine.apply import ApplyStats, InMemoryMerger
from merge_engine.recipe import MergeRecipe


def load_causal_lm(path: str | Path, *, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory, on ``device``, in eval
    mode. ``dtype`` is a torch dtype name or ``auto`` (the config's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_engine.dtypes import torch_dtype as dtype_of

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a saved model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else dtype_of(dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class Candidate:
    """A resident model and the in-place merger that writes each candidate recipe into it.

    ``cache_sources`` keeps every source tensor read (a search re-merges the same models many
    times); an ablation grid of a few 7B recipes turns it off to stay within RAM.
    """

    def __init__(self, model: Any, tokenizer: Any, *, device: str = "cpu", cache_sources: bool = True,
                 allow_pickle: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.merger = InMemoryMerger(model, device=device, cache_sources=cache_sources,
                                     allow_pickle=allow_pickle)

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str = "auto", device: str = "cpu",
             cache_sources: bool = True, allow_pickle: bool = False) -> Candidate:
        """Load the model in ``model_dir`` (a local directory) as the resident model."""
        model, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=device)
        return cls(model, tokenizer, device=device, cache_sources=cache_sources, allow_pickle=allow_pickle)

    def apply(self, recipe: MergeRecipe) -> ApplyStats:
        """Write ``recipe``'s merge into the resident model.

        The engine checks every merged tensor before writing it and raises NonFiniteError naming
        the tensor (the resident model then keeps that tensor's previous values).
        """
        return self.merger.apply(recipe)

    def close(self) -> None:
        """Release the merger's readers and cached source tensors."""
        self.merger.close()

    def __enter__(self) -> Candidate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
