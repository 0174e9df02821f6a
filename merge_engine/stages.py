"""Multi-stage recipes (mergekit-multi's format): YAML documents, each a recipe, joined by ``---``.

A document with a ``name`` is an intermediate merge; any model reference whose path is that
name (``model: first-merge``, ``base_model: first-merge``, ``first-merge+adapter``, a tokenizer
source) reads its output. As in mergekit-multi, documents may come in any order: stages run in
the order their references require (file order where free), and a cycle is an error. The final
stage is the document without a name; when every document is named, it is the one no other
stage reads. A one-document file is a plain recipe (one unnamed-or-named stage).

Everything here checks the file alone (no model is opened): :func:`load_stages` returns stages
in run order or raises RecipeError listing every problem, each naming the stage and the fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from merge_engine.errors import RecipeError
from merge_engine.io.refs import ModelRef
from merge_engine.recipe import (MergeRecipe, expand_vars, parse_recipe, read_yaml_documents,
                                 unset_variable)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage recipe: its ``name`` (None for an unnamed final stage),
    its recipe (references to other stages still by name) and the stage names it reads."""

    name: str | None
    recipe: MergeRecipe
    needs: tuple[str, ...]

    @property
    def label(self) -> str:
        """How messages name the stage."""
        return f"stage {self.name}" if self.name is not None else "the final (unnamed) stage"


def load_stages(path: str | Path, variables: Mapping[str, str] | None = None) -> list[Stage]:
    """The stages of recipe file ``path`` in run order, the final one last (``${NAME}``s expanded
    from ``variables``, then the environment, as for one recipe); RecipeError lists every problem."""
    docs = read_yaml_documents(path)
    unset = unset_variable(path)
    return parse_stages([expand_vars(d, variables or {}, unset) for d in docs], source=str(path))


def parse_stages(docs: Sequence[Any], *, source: str = "recipe") -> list[Stage]:
    """Stages from parsed YAML documents (see :func:`load_stages`)."""
    if not docs:
        raise RecipeError(f"{source}: no recipe in the file; give at least one document with 'merge_method'")
    recipes: list[MergeRecipe] = []
    problems: list[str] = []
    for i, doc in enumerate(docs, 1):
        where = source if len(docs) == 1 else f"{source} document {i}"
        try:
            recipes.append(parse_recipe(doc, source=where))
        except RecipeError as err:
            problems.extend(err.problems)
    if problems:
        raise RecipeError(problems)
    if len(recipes) == 1:
        return [Stage(recipes[0].name, recipes[0], ())]
    return order_stages(recipes, source)


def order_stages(recipes: Sequence[MergeRecipe], source: str = "recipe") -> list[Stage]:
    """Check names and references of ``recipes`` (several documents) and sort them into run order."""
    problems: list[str] = []
    names = [r.name for r in recipes]
    for i, name in enumerate(names, 1):
        if name is not None and not NAME.match(name):
            problems.append(f"{source} document {i}: name {name!r} must be letters, digits, '.', '_' "
                            "or '-' (it names a folder and is used as a model reference); rename it")
    for name in sorted({n for n in names if names.count(n) > 1}, key=str):
        what = f"name {name!r} is used by several documents" if name is not None else \
            "several documents have no name"
        problems.append(f"{source}: {what}; give each intermediate stage its own name and leave "
                        "only the final stage unnamed")
    if problems:
        raise RecipeError(problems)
    known = {n for n in names if n is not None}
    stages = []
    for recipe in recipes:
        stage = Stage(recipe.name, recipe, ())
        needs = []
        for ref in stage_refs(recipe):
            if ref.path in known:
                if ref.revision:
                    problems.append(f"{source}: {stage.label} reads {ref}: stages have no revisions; "
                                    f"drop '@{ref.revision}'")
                if ref.path not in needs:
                    needs.append(ref.path)
            elif "/" not in ref.path and "\\" not in ref.path and not Path(ref.path).expanduser().exists():
                close = difflib.get_close_matches(ref.path, sorted(known), n=1)
                hint = f"did you mean stage {close[0]!r}?" if close else \
                    f"name a stage ({', '.join(sorted(known))}), a local directory or a hub id 'org/name'"
                problems.append(f"{source}: {stage.label} reads model {ref.path!r}, which is no stage of "
                                f"this file nor a local directory; {hint}")
        stages.append(Stage(recipe.name, recipe, tuple(needs)))
    if problems:
        raise RecipeError(problems)
    ordered = _topological(stages, source)
    finals = [s for s in stages if s.name is None]
    if not finals:
        unused = [s for s in stages if not any(s.name in t.needs for t in stages)]
        if len(unused) > 1:
            raise RecipeError(f"{source}: stages {', '.join(str(s.name) for s in unused)} are read by no "
                              "other stage, so the final one is unclear; remove the name of the final stage")
        finals = unused
    final = finals[0]
    return [s for s in ordered if s is not final] + [final]


def _topological(stages: list[Stage], source: str) -> list[Stage]:
    """Stages with every stage after those it reads (file order where free); a cycle is an error."""
    by_name = {s.name: s for s in stages if s.name is not None}
    done: list[Stage] = []
    state: dict[int, str] = {}

    def visit(stage: Stage, path: list[str]) -> None:
        if state.get(id(stage)) == "done":
            return
        if state.get(id(stage)) == "open":
            cycle = " -> ".join(path[path.index(str(stage.name)):] + [str(stage.name)])
            raise RecipeError(f"{source}: stages read each other in a cycle ({cycle}); "
                              "make one of them read models only")
        state[id(stage)] = "open"
        for need in stage.needs:
            visit(by_name[need], path + [str(stage.name)])
        state[id(stage)] = "done"
        done.append(stage)

    for stage in stages:
        visit(stage, [])
    return done


def stage_refs(recipe: MergeRecipe) -> list[ModelRef]:
    """Every model reference in ``recipe`` (models, bases, tokenizer sources, token sources)."""
    found: list[ModelRef] = []
    map_refs(recipe, lambda ref: found.append(ref) or ref)
    return found


def map_refs(value: Any, fn: Callable[[ModelRef], ModelRef]) -> Any:
    """``value`` (a recipe or any part of one) with every ModelRef replaced by ``fn(ref)``.

    Walks the frozen models structurally, so every place a recipe holds a model is covered
    and nothing else (a chat template string that happens to equal a stage name is left alone).
    """
    if isinstance(value, ModelRef):
        return fn(value)
    if isinstance(value, BaseModel):
        update = {}
        for key in type(value).model_fields:
            old = getattr(value, key)
            new = map_refs(old, fn)
            if new is not old:
                update[key] = new
        return value.model_copy(update=update) if update else value
    if isinstance(value, (list, tuple)):
        items = [map_refs(v, fn) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        items = {k: map_refs(v, fn) for k, v in value.items()}
        return value if all(items[k] is value[k] for k in value) else items
    return value


def bind(recipe: MergeRecipe, where: Mapping[str, ModelRef | str | Path]) -> MergeRecipe:
    """``recipe`` with each reference to a stage named in ``where`` pointing at ``where[name]``
    (a folder holding that stage's output, or a ModelRef); adapters on a stage are kept."""
    def swap(ref: ModelRef) -> ModelRef:
        if ref.path not in where:
            return ref
        target = where[ref.path]
        path = target.path if isinstance(target, ModelRef) else str(target)
        return ModelRef(path, None, ref.lora)
    return map_refs(recipe, swap)


def needed_stages(stages: Sequence[Stage], names: Iterable[str]) -> set[str]:
    """``names`` and every stage they read, directly or through others (by stage name)."""
    by_name = {s.name: s for s in stages}
    needed: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].needs)
    return needed


def stages_yaml(stages: Sequence[Stage]) -> str:
    """The stages as one multi-document YAML text (run order), as a recipe file would hold them."""
    return "---\n".join(s.recipe.to_yaml() for s in stages)


def with_overrides(stages: Sequence[Stage], overrides: Mapping[str | None, MergeRecipe]) -> list[Stage]:
    """``stages`` with the recipes of the stages named in ``overrides`` replaced (each keeps
    its stage's name; ``None`` is the unnamed final stage), re-checked and re-ordered."""
    names = {s.name for s in stages}
    unknown = [n for n in overrides if n not in names]
    if unknown:
        raise RecipeError(f"no stage named {unknown[0]!r} to replace; stages are "
                          f"{', '.join(str(s.name) for s in stages)}")
    if not overrides:
        return list(stages)
    recipes = [overrides[s.name].model_copy(update={"name": s.name}) if s.name in overrides else s.recipe
               for s in stages]
    return order_stages(recipes, "stages")


def stage_count(path: str | Path) -> int:
    """How many documents recipe file ``path`` holds (RecipeError if it cannot be read)."""
    return len(read_yaml_documents(path))

