"""The README and docs/ promise what the code does: the Commands block lists every option of
every command, every docs/ link resolves, and every key of the search-space schema is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from evomerge.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}".strip())
    if prefix:
        yield prefix, parser


def test_readme_commands_block_lists_every_option():
    block = README.split("## Commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    missing = []
    for name, parser in _commands(build_parser()):
        if not parser._actions or any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            continue  # a group (`zoo`): its subcommands are listed
        lines = [ln for ln in re.split(r"(?<!\\)\n(?!\s)", block) if ln.startswith(f"evomerge {name} ")]
        text = " ".join(lines)
        if not text:
            missing.append(f"evomerge {name}")
        for action in parser._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and long[0] not in ("--help", "--debug") and long[0] not in text:
                missing.append(f"evomerge {name} {long[0]}")
    assert not missing, f"README's Commands block lacks: {missing}"


def test_docs_links_and_references_resolve():
    texts = {p: p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
    code = [p for d in ("evomerge", "merge_engine", "tests", "search_spaces", "ablations", "benchmarks")
            for p in (REPO / d).rglob("*") if p.suffix in (".py", ".yaml", ".md")]
    for path in code:
        texts[path] = path.read_text()
    for path, text in texts.items():
        for ref in re.findall(r"(?<![\w/.])docs/([\w.-]+\.md)", text):
            assert (REPO / "docs" / ref).is_file(), f"{path.relative_to(REPO)} names docs/{ref}"
        if path.parent.name == "docs":
            for ref in re.findall(r"\]\(([\w.-]+\.md)", text):
                assert (path.parent / ref).is_file(), f"{path.name} links {ref}"


def test_search_space_reference_names_every_key():
    from evomerge.evaluate import EvalConfig
    from evomerge.space.layer_path import LayerPath
    from evomerge.space.rungs import Fidelity
    from evomerge.space.schema import Budget, Pruning, SearchParam, SearchSpace, StartPoint

    doc = (REPO / "docs" / "search-space.md").read_text()
    for model in (SearchSpace, EvalConfig, Budget, Pruning, Fidelity, SearchParam, StartPoint,
                  LayerPath):
        for key in model.model_fields:
            assert f"`{key}`" in doc or f"{key}:" in doc or f"{{{key}" in doc or f", {key}" in doc, \
                f"docs/search-space.md does not document {model.__name__}.{key}"
