"""The chat template a merged model gets, from the recipe's ``chat_template`` setting.

The setting takes one of three forms, as in mergekit:

- absent: the output keeps the template its tokenizer source ships (copied with the tokenizer);
- ``auto``: the template most common among the input models (base included), compared after
  stripping surrounding whitespace; a tie goes to the model listed first in the recipe (base
  first). mergekit breaks ties by its set iteration order, which changes between runs; when
  no input ships a template the tokenizer source's own is kept, as in mergekit;
- a name (:data:`NAMES`): one of the standard formats, written as ``.jinja`` files in this
  folder. Each renders its format as publicly described; mergekit's files for ``llama3``
  (a newline after every ``<|eot_id|>``), ``alpaca`` (no blank line before the final
  ``### Response:``, a leading blank line without a system message) and ``exaone`` (the
  template's indentation in the text) render differently, and ``chatml`` and ``mistral`` the same;
- any other string containing ``{``: a Jinja template, used as given.

An input model's template is read from its ``chat_template.jinja`` or else from the
``chat_template`` entry of its ``tokenizer_config.json`` (a list of named templates gives its
``default``), which is where transformers looks too. The output template is written by
:func:`merge_engine.merge.run_merge`; merging in memory does not touch tokenizers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

from merge_engine.errors import CheckpointError
from merge_engine.io.refs import ModelRef

_HERE = Path(__file__).parent
NAMES: tuple[str, ...] = ("alpaca", "chatml", "exaone", "llama3", "mistral")
AUTO = "auto"


@cache
def named_template(name: str) -> str:
    """The Jinja text of the named template (``name`` in :data:`NAMES`)."""
    if name not in NAMES:
        raise KeyError(name)
    return (_HERE / f"{name}.jinja").read_text(encoding="utf-8")


def setting_problem(value: str) -> str | None:
    """Why ``value`` is not a usable ``chat_template`` setting (one line with the fix), or None."""
    if value == AUTO or value in NAMES:
        return None
    if "{" not in value:
        return (f"chat_template {value!r} is not a known template ({', '.join((AUTO, *NAMES))}) "
                "nor a Jinja string; use one of those")
    try:
        import jinja2
    except ImportError:  # transformers brings jinja2; without it there is nothing to check against
        return None
    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as err:
        return (f"chat_template is not valid Jinja (line {err.lineno}: {err.message}); "
                "fix the template or use a named one")
    return None


def shipped_template(model_dir: Path) -> str | None:
    """The chat template the tokenizer in ``model_dir`` carries, or None."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template: Any = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{config} is not a JSON object; repair or remove the file") from None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def most_common(templates: Iterable[str | None]) -> str | None:
    """The most frequent template (stripped) among ``templates``; ties go to the earliest."""
    counts = Counter(t.strip() for t in templates if t and t.strip())
    # Counter keeps first-seen order and most_common sorts stably: the earliest wins a tie
    return counts.most_common(1)[0][0] if counts else None


def output_template(setting: str | None, inputs: list[ModelRef],
                    model_dir: Callable[[ModelRef], Path]) -> str | None:
    """The template text to write into the output, or None to keep the tokenizer source's own.

    ``inputs`` are the recipe's models in recipe order (base first); ``model_dir`` resolves one
    to its local directory (only called for ``auto``).
    """
    if not setting:
        return None
    if setting == AUTO:
        return most_common(shipped_template(model_dir(ref)) for ref in inputs)
    if setting in NAMES:
        return named_template(setting)
    return setting
