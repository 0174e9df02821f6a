"""Build the output vocabulary of a merge and map every input's rows onto it (mergekit's semantics).

* ``base``: the base model's tokenizer (the first model's without a base).
* ``<model>``: that model's tokenizer.
* ``union``: the base's tokenizer, then every token the other models have and it lacks: plain
  tokens first (models in recipe order, each in its own id order), then added tokens (special or
  not, with their settings; the first model's settings win). mergekit walks plain tokens in a
  hash map's order, which changes between runs; ours is fixed.
* then each ``tokenizer.tokens`` key the vocabulary lacks is added as a plain token.

A model's own rows are those below its config's ``vocab_size``; a token at or past it counts as
missing. The base's tokenizer must not hold such tokens (mergekit strips them, which we do not).
A model whose tokenizer cannot be loaded is taken to share the base's, with a warning (as mergekit).
Building loads tokenizers with transformers (imported here only), so results are cached per inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_engine.errors import RecipeError
from merge_engine.io.refs import ModelRef


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    """``vocab_size`` of a config.json (or of its ``text_config``), None when it declares none."""
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), Mapping):
        size = config["text_config"].get("vocab_size")
    return int(size) if isinstance(size, int) else None


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The output vocabulary: built once per inputs, then read-only.

    ``tokens`` maps output token -> output id; ``rows`` is the output's embedding rows (``len(tokens)``
    rounded up to ``pad_to_multiple_of``); ``index[model][i]`` is the row of output token ``i`` in
    that model's tensors, -1 where the model lacks it; ``originals[model]`` is the model's own
    token -> id (for ``model_token`` sources named by token).
    """

    tokenizer: Any
    tokens: dict[str, int]
    rows: int
    index: dict[ModelRef, tuple[int, ...]]
    originals: dict[ModelRef, dict[str, int]]
    warnings: tuple[str, ...] = field(default=())

    def save(self, directory: Path) -> list[str]:
        """Write the tokenizer's files into ``directory``; returns their names."""
        self.tokenizer.save_pretrained(str(directory))
        return sorted(p.name for p in Path(directory).iterdir() if p.is_file())


def recipe_vocabulary(recipe: Any, readers: Mapping[ModelRef, Any], base: ModelRef,
                      warnings: list[str]) -> Vocabulary | None:
    """The output vocabulary of ``recipe`` (which sets a tokenizer source) over the opened
    ``readers``; None, with a note in ``warnings``, when some reader holds a config alone (no
    tokenizer files to build from). Raises RecipeError when it cannot be built."""
    from merge_engine.io.config_only import ConfigOnlyReader
    from merge_engine.io.resolve import resolve_model_dir

    if any(isinstance(r, ConfigOnlyReader) for r in readers.values()):
        warnings.append("the output tokenizer is not built from configs alone; its rows are "
                        "checked when the merge runs")
        return None
    source = recipe.tokenizer_source_setting()
    dirs = {ref: r.model_dir for ref, r in readers.items()}
    if isinstance(source, ModelRef) and source not in dirs:
        dirs[source] = resolve_model_dir(source)
    settings = recipe.tokenizer
    vocab = build_vocabulary(source, base, list(readers), dirs,
                             {ref: config_vocab_size(r.config) for ref, r in readers.items()},
                             tuple((settings.tokens or {}) if settings else ()),
                             settings.pad_to_multiple_of if settings else None)
    warnings.extend(vocab.warnings)
    return vocab


def build_vocabulary(source: ModelRef | str, base: ModelRef, models: Sequence[ModelRef],
                     dirs: Mapping[ModelRef, Path], sizes: Mapping[ModelRef, int | None],
                     add_tokens: Sequence[str] = (), pad_to_multiple_of: int | None = None) -> Vocabulary:
    """The output vocabulary for ``source`` (``"base"``, ``"union"`` or a model); ``models`` are
    the merged models (base included), ``dirs`` where each (and a model source) lives, ``sizes``
    each model's config ``vocab_size``. Raises RecipeError (one line) when it cannot be built."""
    return _build(source, base, tuple(dict.fromkeys([base, *models])),
                  tuple(sorted((str(k), str(v)) for k, v in dirs.items())),
                  tuple(sorted((str(k), v) for k, v in sizes.items())), tuple(add_tokens), pad_to_multiple_of)


@functools.lru_cache(maxsize=4)
def _build(source: ModelRef | str, base: ModelRef, models: tuple[ModelRef, ...],
           dirs_key: tuple[tuple[str, str], ...], sizes_key: tuple[tuple[str, int | None], ...],
           add_tokens: tuple[str, ...], pad_to_multiple_of: int | None) -> Vocabulary:
    dirs = dict(dirs_key)
    sizes = dict(sizes_key)
    warnings: list[str] = []
    toks: dict[ModelRef, Any] = {base: _load(base, dirs[str(base)])}
    base_size = sizes.get(str(base)) or len(toks[base].get_vocab())
    beyond = [t for t, i in toks[base].get_vocab().items() if i >= base_size]
    if beyond:
        raise RecipeError(f"the tokenizer of base {base} has {len(beyond)} tokens at ids >= its "
                          f"vocab_size {base_size} (e.g. {beyond[0]!r}); stripping them is not "
                          "supported: use a base whose tokenizer fits its embedding rows")
    for model in models:
        if model == base:
            continue
        try:
            toks[model] = _load(model, dirs[str(model)])
        except RecipeError as err:
            warnings.append(f"{err}; taking it to share the tokenizer of {base}")

    if source == "union":
        out = _union(base, dirs[str(base)], toks, sizes)
    elif source == "base":
        out = _load(base, dirs[str(base)])
    else:
        out = _load(source, dirs[str(source)])
    known = out.get_vocab()
    for token in add_tokens:
        if token not in known:
            out.add_tokens(token)
            known = out.get_vocab()

    vocab = dict(sorted(out.get_vocab().items(), key=lambda kv: kv[1]))
    rows = len(vocab)
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    index: dict[ModelRef, tuple[int, ...]] = {}
    originals: dict[ModelRef, dict[str, int]] = {}
    for model in models:
        own = (toks[model] if model in toks else toks[base]).get_vocab()
        size = sizes.get(str(model)) or len(own)
        originals[model] = own
        index[model] = tuple(i if (i := own.get(t, -1)) < size else -1 for t in vocab)
    return Vocabulary(out, vocab, rows, index, originals, tuple(warnings))


def _union(base: ModelRef, base_dir: str, toks: Mapping[ModelRef, Any],
           sizes: Mapping[str, int | None]) -> Any:
    out = _load(base, base_dir)  # a fresh copy: it is extended in place
    have = set(out.get_vocab())
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tok in toks.items():
        size = sizes.get(str(model)) or len(tok.get_vocab())
        specials = {i: t for i, t in tok.added_tokens_decoder.items() if i < size}
        for text, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and i not in specials and text not in have:
                plain.setdefault(text, None)
        for token in specials.values():
            added.setdefault(token.content, token)
    for text in plain:
        if text not in added:
            out.add_tokens(text)
    for token in added.values():
        out.add_tokens(token)  # one the vocabulary holds keeps its id
    return out


def _load(model: ModelRef | str, directory: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as err:  # transformers raises many kinds for a missing/broken tokenizer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"the tokenizer of {model} cannot be loaded from {directory} ({first[:200]}); "
                          "add its tokenizer files or choose another tokenizer source") from None
