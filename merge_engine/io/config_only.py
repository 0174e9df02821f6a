"""A reader for models you do not have: tensor names and shapes from ``config.json`` alone.

A 7B checkpoint is 13 GB; its ``config.json`` is 600 bytes and says everything validation needs.
:class:`ConfigOnlyReader` builds the architecture on PyTorch's ``meta`` device (no memory, no
weights) and offers the read-only part of :class:`merge_engine.io.reader.CheckpointReader`:
``config``, ``tensor_names``, ``shape``, ``dtype``, ``nbytes``. ``merge_engine.session`` uses it
for the models a caller lists in ``model_configs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from merge_engine.dtypes import torch_dtype
from merge_engine.errors import CheckpointError
from merge_engine.io.reader import read_config


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
        self._dtype = _config_dtype(self._config)
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


def _config_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    try:
        return torch_dtype(str(name))
    except ValueError:  # absent, "auto" or not a float type
        return torch.float32
