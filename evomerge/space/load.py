"""Reading a search space: YAML, ``${VAR}`` expansion, paths relative to the file, layer count.

    space = load_space("search_spaces/zoo_demo.yaml", variables={"ZOO": "zoo"})

:func:`parse_space` builds a space from parsed YAML: it fills ``num_layers`` from the models'
``config.json`` (any layer-count key the engine knows; no tensors are read) and reports every
problem at once in one :class:`~evomerge.space.schema.SpaceError`. :func:`expand_vars` is also
what ablation grids use for their ``${VAR}`` placeholders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.errors import validation_problems
from evomerge.space.schema import SearchSpace, SpaceError
from evomerge.space.stages import stage_names_in, stage_read
from merge_engine.layout import LAYER_COUNT_KEYS, num_layers_from_config
from merge_engine.recipe import VAR, expand_vars  # noqa: F401  (one ${VAR} implementation, re-exported)

MAX_SPACE_BYTES = 1 << 20  # a search space is a page of YAML; anything bigger is not one
MAX_YAML_NODES = 100_000  # values after alias expansion: aliases nest into "YAML bombs"

def _unset(key: str) -> SpaceError:
    return SpaceError(f"${{{key}}} is not set; pass it (e.g. export {key}=...) or edit the space",
                      "search space")


def _local_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Model paths written as ./x or ../x are relative to the space file, not the working dir
    (both parts of ``model+adapter``)."""
    def local(part: str) -> str:
        return str((base_dir / Path(part).expanduser()).resolve()) if part.startswith(("./", "../", "~")) else part

    def fix(entry: Any) -> Any:
        path = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(path, str) and (new := "+".join(local(p) for p in path.split("+", 1))) != path:
            return {**entry, "model": new} if isinstance(entry, dict) else new
        return entry

    if isinstance(data.get("models"), list):
        data["models"] = [fix(m) for m in data["models"]]
    if data.get("base_model") is not None:
        data["base_model"] = fix(data["base_model"])
    stages = data.get("stages")
    if isinstance(stages, str) or isinstance(stages, dict) and isinstance(stages.get("file"), str):
        file = stages if isinstance(stages, str) else stages["file"]
        file = str((base_dir / Path(file).expanduser()).resolve())
        data["stages"] = file if isinstance(stages, str) else {**stages, "file": file}
    starts = data.get("start")
    starts = [starts] if isinstance(starts, (str, dict)) else starts
    if isinstance(starts, list):
        data["start"] = [{**s, "recipe": str(base_dir / s["recipe"])}
                         if isinstance(s, dict) and isinstance(s.get("recipe"), str) else s
                         for s in ({"recipe": s} if isinstance(s, str) and s != "equal" else s
                                   for s in starts)]
    for key in ("eval", "report_eval"):
        block = data.get(key)
        preset = block.get("preset") if isinstance(block, dict) else None
        if isinstance(preset, str) and Path(preset).suffix and not Path(preset).is_absolute():
            block["preset"] = str((base_dir / preset).resolve())  # a preset file beside the space
        if isinstance(block, dict) and isinstance(block.get("include_paths"), list):
            block["include_paths"] = [str((base_dir / p).resolve()) if not Path(p).is_absolute() else p
                                      for p in block["include_paths"]]


def model_num_layers(path: str) -> int:
    """The layer count a model's config.json declares (no tensors are read)."""
    from merge_engine.errors import MergeError
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import resolve_model_dir

    try:
        folder = resolve_model_dir(ModelRef.parse(path))
    except (MergeError, ValueError) as err:
        raise SpaceError(f"model {path}: {err}") from None
    config = folder / "config.json"
    if not config.is_file():
        raise SpaceError(f"model {path} has no config.json; give a transformers model directory")
    try:
        layers = num_layers_from_config(json.loads(config.read_text()))
    except (ValueError, OSError) as err:
        raise SpaceError(f"model {path}: {config} is not readable JSON ({err}); check the model's files") from None
    if layers is None:
        raise SpaceError(f"model {path}: config.json has no layer count ({', '.join(LAYER_COUNT_KEYS)})")
    return layers


def _num_layers(data: Mapping[str, Any], problems: list[str]) -> int | None:
    counts: dict[str, int] = {}
    stages = stage_names_in(data.get("stages"))  # models reading a fixed stage: no config to read
    for entry in [data.get("base_model"), *(data.get("models") or [])]:
        path = entry.get("model") if isinstance(entry, Mapping) else entry
        if isinstance(path, str) and not stage_read(path, stages):
            try:
                counts[path] = model_num_layers(path)
            except SpaceError as err:
                problems.append(err.problems[0])
    if len(set(counts.values())) > 1:
        problems.append(f"models have different numbers of layers {counts}; "
                        "this search merges models of one architecture")
    return next(iter(counts.values()), None)


def parse_space(data: Any, *, source: str = "search space", base_dir: Path | None = None,
                variables: Mapping[str, str] | None = None) -> SearchSpace:
    """Build a space from parsed YAML; every problem is reported in one :class:`SpaceError`."""
    if not isinstance(data, Mapping):
        raise SpaceError(f"expected a mapping with 'models' and 'method', got {type(data).__name__}",
                         source)
    data = expand_vars(dict(data), variables or {}, _unset)
    if base_dir is not None:
        _local_paths(data, base_dir)
    problems: list[str] = []
    if "num_layers" not in data and (layers := _num_layers(data, problems)) is not None:
        data["num_layers"] = layers
    layer_problems = bool(problems)
    objectives = data.get("objectives")
    n_objectives = len(objectives) if isinstance(objectives, (list, tuple)) and objectives else 1
    # The sampler registry belongs to the search (which imports spaces): read at call time.
    from evomerge.search.samplers import sampler_problems

    problems += sampler_problems(data.get("sampler"), n_objectives)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as err:
        problems += [p for p in validation_problems(err)
                     if not (layer_problems and p.startswith("num_layers:"))]
        raise SpaceError(problems, source) from None
    if problems:
        raise SpaceError(problems, source)
    return space


def load_space(path: str | Path, variables: Mapping[str, str] | None = None) -> SearchSpace:
    """Read a search space YAML (``${VAR}`` expanded from ``variables`` or the environment);
    a file too big, not UTF-8 or full of YAML aliases is refused before it is parsed."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file {path} does not exist; check the path", "search space")
    text = read_space_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"not valid YAML: {str(err).splitlines()[0]}; fix the syntax", str(path)) from None
    return parse_space(data, source=str(path), base_dir=path.parent.resolve(), variables=variables)


def read_space_text(path: Path) -> str:
    """The text of space file ``path`` (an existing file), refused before it is parsed when it is
    too big, not UTF-8, or full of YAML aliases (one :class:`SpaceError` line each)."""
    size = path.stat().st_size
    if size > MAX_SPACE_BYTES:
        raise SpaceError(f"the file is {size} bytes; a search space is at most "
                         f"{MAX_SPACE_BYTES} bytes of YAML; check that this is the right file",
                         str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpaceError(f"not UTF-8 text (byte {err.start}); save the file as UTF-8", str(path)) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        nodes = _expanded_size(root, {}) if root is not None else 0
    except yaml.YAMLError:
        return text  # load_space reports the syntax error with its line
    except RecursionError:
        raise SpaceError("YAML nested too deeply; a search space is a few levels deep", str(path)) from None
    if nodes > MAX_YAML_NODES:
        raise SpaceError(f"its YAML aliases (*name) expand to over {MAX_YAML_NODES} values "
                         f"({nodes}); a search space is small: write the values out", str(path))
    return text


def _expanded_size(node: Any, seen: dict[int, int]) -> int:
    """Values in the document once every alias is expanded (shared nodes counted per use,
    computed once each: a "billion laughs" file costs its size here, not its expansion)."""

    key = id(node)
    if key in seen:
        return seen[key]
    seen[key] = 1  # a node that contains itself counts once
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(c, seen) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, seen) + _expanded_size(v, seen) for k, v in node.value)
    seen[key] = min(size, 10 * MAX_YAML_NODES)
    return seen[key]
