"""Build (or reuse) a zoo: a tiny base model and one expert per skill fine-tuned from it.

Recipes are fixed per variant (:data:`RECIPES`): ``demo`` is the real zoo (a few minutes on two
cores), ``deep`` the same with six layers per model for data-flow (layer-path) search (about
three times as long), ``fixture`` a tiny one for tests (seconds). A build is cached by its ``zoo.json``
(variant, seed and :data:`ZOO_VERSION` must match) and written atomically: everything goes to a
temp sibling directory that is renamed to ``out_dir`` only when complete.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from evomerge.errors import EvomergeError, atomic_dir
from evomerge.zoo.manifest import MANIFEST_NAME, ZooManifest
from evomerge.zoo.train import ModelSpec, TrainSpec

# Bump whenever a recipe, a skill generator or the training code changes what a build produces.
ZOO_VERSION = "1"
# One intra-op thread: these matrices are too small for a second thread to pay off, a fixed
# count keeps float reductions (and so the weights) identical run to run, and it stays fast on
# a machine shared with other jobs (two spinning threads there are many times slower).
BUILD_THREADS = 1


@dataclass(frozen=True)
class ZooRecipe:
    """How one variant is built. Experts start from the base and train ``expert.trainable`` on
    their own skill, with ``replay`` of the batch drawn from the base mixture."""

    model: ModelSpec
    skills: tuple[str, ...]
    base: TrainSpec
    expert: TrainSpec  # mixture is filled in per skill
    replay: float
    score_examples: int  # report-split examples per skill scored at build time


# The base learns each skill on part of its input space only (``<skill>_part``: tens digits 1-5,
# letters a-p), so it is partly competent everywhere; each expert then learns its full skill
# with a small learning rate and replay of the base mixture.
_SKILLS = ("add", "sort", "shift")
_BASE_MIX = {"add_part": 1.0, "sort_part": 0.5, "shift_part": 0.5, "copy": 0.3}
_DEMO = ZooRecipe(
    model=ModelSpec(hidden=128, layers=2, heads=2, intermediate=512),
    skills=_SKILLS,
    base=TrainSpec(steps=700, lr=2e-3, batch=48, warmup=50, mixture=_BASE_MIX),
    expert=TrainSpec(steps=200, lr=5e-4, batch=48, warmup=20),
    replay=0.3,
    score_examples=300,
)
RECIPES: dict[str, ZooRecipe] = {
    "demo": _DEMO,
    # demo's skills and training, six layers instead of two: a 2-layer model leaves a layer-path
    # search (evomerge/space/layer_path.py) almost nothing to choose, since any path that is not
    # an input model replaces half of the network; six layers give it depth to drop, repeat and mix.
    "deep": replace(_DEMO, model=replace(_DEMO.model, layers=6)),
    "fixture": ZooRecipe(
        model=ModelSpec(hidden=128, layers=1, heads=2, intermediate=256),
        skills=_SKILLS,
        base=TrainSpec(steps=60, lr=3e-3, batch=32, warmup=10, mixture=_BASE_MIX),
        expert=TrainSpec(steps=20, lr=1e-3, batch=32, warmup=5),
        replay=0.3,
        score_examples=40,
    ),
}


def default_zoo_dir(variant: str) -> Path:
    """``$EVOMERGE_CACHE/zoo/<variant>``, or ``~/.cache/evomerge/zoo/<variant>`` without the variable."""
    root = os.environ.get("EVOMERGE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "evomerge"
    return base / "zoo" / variant


def expert_name(skill: str) -> str:
    """Directory name of the expert for ``skill``."""
    return f"{skill}_expert"


def recipe_for(variant: str) -> ZooRecipe:
    """The recipe of ``variant``; an error naming the closest variant otherwise."""
    if variant not in RECIPES:
        close = difflib.get_close_matches(variant, RECIPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EvomergeError(f"unknown zoo variant {variant!r} (known: {', '.join(RECIPES)}){hint}")
    return RECIPES[variant]


def expert_spec(recipe: ZooRecipe, skill: str, seed: int) -> TrainSpec:
    """The expert's training run: its own skill at weight ``1 - replay``, the base mixture at ``replay``."""
    total = sum(recipe.base.mixture.values())
    mixture = {s: recipe.replay * w / total for s, w in recipe.base.mixture.items()}
    mixture[skill] = mixture.get(skill, 0.0) + 1.0 - recipe.replay
    return replace(recipe.expert, mixture=mixture, seed=seed * 1000 + 1 + recipe.skills.index(skill))


def _cached(out_dir: Path, variant: str, seed: int) -> ZooManifest | None:
    try:
        manifest = ZooManifest.read(out_dir)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if (manifest.variant, manifest.seed, manifest.zoo_version) != (variant, seed, ZOO_VERSION):
        return None
    if not all((path / "config.json").is_file() for path in manifest.models.values()):
        return None
    return manifest


def build_zoo(out_dir: Path, variant: str = "demo", seed: int = 0, force: bool = False,
              log: Callable[[str], None] = print) -> ZooManifest:
    """Build the ``variant`` zoo into ``out_dir`` (``base/``, ``<skill>_expert/``, ``zoo.json``) and
    return its manifest. An existing build with the same variant, seed and zoo version is returned
    without retraining unless ``force``. Same seed, same machine: same weights."""
    import torch

    out_dir = Path(out_dir).expanduser().resolve()
    recipe = recipe_for(variant)
    if not force and (cached := _cached(out_dir, variant, seed)) is not None:
        log(f"zoo {variant} (seed {seed}) already built at {out_dir}")
        return cached
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with atomic_dir(out_dir) as tmp:
            manifest = _build_into(tmp, recipe, variant, seed, log)
    finally:
        torch.set_num_threads(threads)
    log(f"zoo {variant} built at {out_dir} in {manifest.build_seconds:.0f}s")
    return replace(manifest, root=out_dir)


def _build_into(root: Path, recipe: ZooRecipe, variant: str, seed: int,
                log: Callable[[str], None]) -> ZooManifest:
    import torch
    import transformers

    from evomerge.zoo.scoring import exact_match, mc_accuracy
    from evomerge.zoo.tasks import split_examples
    from evomerge.zoo.checkpoint import save_checkpoint
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import make_model, train

    start = time.perf_counter()
    tok = build_tokenizer()
    evals = {s: split_examples(s, "report", recipe.score_examples) for s in recipe.skills}

    def score(model) -> dict[str, dict[str, float]]:
        return {s: {"mc": round(mc_accuracy(model, tok, evals[s]), 4),
                    "em": round(exact_match(model, tok, evals[s]), 4)} for s in recipe.skills}

    def save(model, name: str) -> None:
        save_checkpoint(model, tok, root / name)

    log(f"training base ({recipe.base.steps} steps) ...")
    model = make_model(recipe.model, tok, seed)
    train(model, tok, replace(recipe.base, seed=seed * 1000), log=log)
    save(model, "base")
    scores = {"base": score(model)}
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {}
    for skill in recipe.skills:
        log(f"training {expert_name(skill)} ({recipe.expert.steps} steps) ...")
        model.load_state_dict(base_state)
        train(model, tok, expert_spec(recipe, skill, seed), log=log)
        save(model, expert_name(skill))
        experts[skill] = expert_name(skill)
        scores[expert_name(skill)] = score(model)
    for name, per_skill in scores.items():
        log(f"  {name:>14}: " + "  ".join(f"{s} mc {v['mc']:.2f} em {v['em']:.2f}"
                                          for s, v in per_skill.items()))
    manifest = ZooManifest(
        root=root, variant=variant, seed=seed, zoo_version=ZOO_VERSION, skills=recipe.skills,
        base="base", experts=experts, scores=scores,
        build_seconds=round(time.perf_counter() - start, 1),
        versions={"torch": torch.__version__, "transformers": transformers.__version__})
    manifest.write()
    return manifest
