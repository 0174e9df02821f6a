"""Validate recipes against models you do not have: tensor names and shapes from ``config.json``.

A 7B checkpoint is 13 GB; its ``config.json`` is 600 bytes and says everything validation needs.
:class:`ConfigOnlyReader` builds the architecture on PyTorch's ``meta`` device (no memory, no
weights) and offers the read-only part of :class:`merge_engine.io.reader.CheckpointReader`:
``config``, ``tensor_names``, ``shape``, ``dtype``, ``nbytes``. :func:`validate_with_configs`
runs the engine's own checks (schema, method, parameters, architectures, shapes, layer ranges,
plan) with such readers standing in for some or all models.

    report = validate_with_configs(recipe, {"epfl-llm/meditron-7b": "configs/epfl-llm/meditron-7b"})
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from merge_engine.errors import CheckpointError, MergeError
from merge_engine.io.reader import read_config
from merge_engine.io.refs import ModelRef
from merge_engine.plan import DTYPE_OF
from merge_engine.recipe import MergeRecipe
from merge_engine.validate import Report, check_models, check_recipe


class ConfigOnlyReader:
    """Tensor names, shapes and dtypes of the checkpoint ``config.json`` describes, without weights.

    Names are what ``save_pretrained`` writes: parameters (a tied output head appears once, under
    its input-embedding name) plus persistent buffers. The dtype of every tensor is the config's
    ``dtype``/``torch_dtype`` (float32 when absent). Built once from ``config_dir``; ``get`` raises,
    since there is no data. Architectures with custom code are refused unless
    ``trust_remote_code``.
    """

    def __init__(self, config_dir: str | Path, *, name: str | None = None,
                 trust_remote_code: bool = False) -> None:
        self.model_dir = Path(config_dir)
        self.name = name or str(config_dir)
        path = self.model_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"model {self.name}: no config.json in {self.model_dir}; "
                                  "bundle the model's config.json there")
        self._config = read_config(self.model_dir, self.name, trust_remote_code)
        self._dtype = DTYPE_OF.get(str(self._config.get("dtype") or self._config.get("torch_dtype")),
                                   torch.float32)
        self._shapes = _meta_shapes(self.model_dir, self.name, trust_remote_code)
        self._names = tuple(sorted(self._shapes))

    @property
    def config(self) -> dict[str, Any]:
        """The parsed config.json (a copy: callers may modify it)."""
        return json.loads(json.dumps(self._config))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self._shapes[name]
        except KeyError:
            raise CheckpointError(f"model {self.name} has no tensor {name!r}; check the name") from None

    def dtype(self, name: str) -> torch.dtype:
        self.shape(name)
        return self._dtype

    def nbytes(self, name: str) -> int:
        numel = 1
        for n in self.shape(name):
            numel *= n
        return numel * self._dtype.itemsize

    def get(self, name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise CheckpointError(f"model {self.name} is known by its config only (no weights); "
                              "download the model to merge it")

    def close(self) -> None:
        """Nothing to release (kept for the reader interface)."""

    def __enter__(self) -> ConfigOnlyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConfigOnlyReader({self.name!r}, {len(self._names)} tensors)"


def _meta_shapes(config_dir: Path, name: str, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"model {name}: transformers cannot build a causal LM from "
                              f"{config_dir / 'config.json'} ({first}); check the config") from None
    # named_parameters() drops the second name of a shared (tied) tensor, as save_pretrained does.
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in persistent})
    return shapes


def validate_with_configs(recipe: MergeRecipe, model_configs: Mapping[str, str | Path], *,
                          readers: dict[str, Any] | None = None,
                          trust_remote_code: bool = False) -> Report:
    """Every problem of ``recipe`` the engine can find, with config-only stand-ins for models.

    ``model_configs`` maps a model reference's path (``org/name``, as written in the recipe) to a
    folder holding its ``config.json``. A model not listed there must be a local model directory
    (read by its headers, as ``evomerge validate`` does). ``readers`` caches readers by path
    across calls (building a 7B architecture on ``meta`` takes a few seconds).
    """
    from merge_engine.io.reader import CheckpointReader
    from merge_engine.io.resolve import looks_local

    report = check_recipe(recipe, Report())
    if report.problems:
        return report
    cache = readers if readers is not None else {}
    with ExitStack() as stack:
        opened: dict[ModelRef, Any] = {}
        for ref in recipe.referenced_models():
            key = ref.path
            try:
                if key in cache:
                    opened[ref] = cache[key]
                elif key in model_configs:
                    opened[ref] = cache[key] = ConfigOnlyReader(
                        model_configs[key], name=str(ref), trust_remote_code=trust_remote_code)
                elif Path(key).expanduser().is_dir():
                    opened[ref] = stack.enter_context(CheckpointReader(
                        Path(key).expanduser(), trust_remote_code=trust_remote_code))
                else:
                    where = "directory does not exist" if looks_local(key) else "is not downloaded"
                    report.add(f"model {ref}: {where} and no config is bundled for it; "
                               f"add '{key}: DIR' (a folder with its config.json) to model_configs")
            except MergeError as err:
                report.add(str(err))
        if not report.problems:
            check_models(recipe, opened, report)
    return report
