"""Merge a recipe to disk: validate → plan → execute → sharded safetensors, published atomically."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_engine.chat_templates import output_template
from merge_engine.devices import pick_device
from merge_engine.errors import CheckpointError
from merge_engine.graph import Executor
from merge_engine.io.stream import PlannedTensor
from merge_engine.io import DEFAULT_SHARD_SIZE
from merge_engine.io.writer import OutputWriter, model_card, tokenizer_files
from merge_engine.plan import MergeContext, MergePlan, output_shape_dtype
from merge_engine.recipe import MergeRecipe
from merge_engine.session import prepare


@dataclass
class MergeResult:
    out_dir: Path | None
    tensors: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    peak_live_tensors: int = 0


def provenance_note(device: torch.device) -> str:
    """The model card's line naming where the merge ran: bits are reproducible per device type."""
    kind = "the CPU" if device.type == "cpu" else "a CUDA GPU"
    return (f"Merged on `{device.type}` (torch {torch.__version__}). The recipe reproduces these bytes "
            f"on {kind}; a merge on another device type may differ in the last bits (reductions "
            "add in another order).\n")


def _write_extras(writer, plan: MergePlan, readers, recipe: MergeRecipe, device: torch.device) -> None:
    from merge_engine.io.resolve import resolve_model_dir

    writer.write_json("config.json", plan.config)
    tok_dir = resolve_model_dir(recipe.tokenizer_model())
    with tempfile.TemporaryDirectory() as tmp:
        if plan.vocabulary is not None:  # the built tokenizer; generation_config.json from its model
            writer.copy_files(tmp, plan.vocabulary.save(Path(tmp)))
            writer.copy_files(tok_dir, [n for n in tokenizer_files(tok_dir) if n == "generation_config.json"])
            tok_config = Path(tmp) / "tokenizer_config.json"
        else:
            writer.copy_files(tok_dir, tokenizer_files(tok_dir))
            tok_config = tok_dir / "tokenizer_config.json"
        template = output_template(recipe.chat_template, recipe.referenced_models(), resolve_model_dir)
        if template is not None:
            # transformers reads chat_template.jinja first; a template kept inside
            # tokenizer_config.json (older transformers read only that one) is replaced too
            writer.write_text("chat_template.jinja", template)
            if tok_config.is_file():
                try:
                    settings = json.loads(tok_config.read_text(encoding="utf-8"))
                except ValueError:
                    raise CheckpointError(f"{tok_config} is not valid JSON; repair the tokenizer source") from None
                if isinstance(settings, dict) and "chat_template" in settings:
                    writer.write_json("tokenizer_config.json", {**settings, "chat_template": template})
    text = recipe.to_yaml()
    writer.write_text("evomerge_recipe.yaml", text)
    card = model_card(text, [str(r) for r in recipe.referenced_models()], recipe.merge_method)
    writer.write_text("README.md", f"{card}\n## Provenance\n\n{provenance_note(device)}")


def run_merge(recipe: MergeRecipe, out_dir: str | Path, *, device: str | None = "auto",
              shard_size: int = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
              trust_remote_code: bool = False, force: bool = False, dry_run: bool = False,
              prefetch: int | None = None, progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """Merge ``recipe`` into ``out_dir``.

    Output goes to a temporary sibling directory that is renamed into place at
    the end, so an interrupted or failed merge leaves nothing at ``out_dir``. ``device``
    (``auto``/``cpu``/``cuda:N``) is resolved once by :func:`merge_engine.devices.pick_device`
    and named in the model card: bytes are identical for merges on one device type.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    with ExitStack() as stack:
        plan, readers = prepare(recipe, stack, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
        if dry_run:
            return MergeResult(None, len(plan.targets), time.perf_counter() - start, plan.warnings)
        device = pick_device(device)
        ctx = MergeContext(readers, device)
        executor = Executor(plan.targets, ctx, prefetch=prefetch)
        with OutputWriter(out_dir, shard_size=shard_size, force=force) as writer:
            writer.plan([PlannedTensor(n.out_name, *output_shape_dtype(n, readers)) for n in plan.targets])
            total = len(plan.targets)
            for i, (node, tensor) in enumerate(executor.run(), 1):
                writer.add(node.out_name, tensor.cpu())
                if progress is not None:
                    progress(i, total)
            _write_extras(writer, plan, readers, recipe, device)
            writer.publish()
        return MergeResult(out_dir, len(plan.targets), time.perf_counter() - start, plan.warnings,
                           executor.peak_live)


def plan_summary(plan: MergePlan) -> str:
    """A short human summary of a plan (for --dry-run)."""
    methods = {t.method for t in plan.targets}
    return json.dumps({"tensors": len(plan.targets), "layers": plan.num_layers,
                       "methods": sorted(methods), "reference": str(plan.reference)})
