"""A merged model held in memory, read like a checkpoint: intermediate stages never touch disk.

:class:`MemoryModel` offers the read interface of :class:`merge_engine.io.reader.CheckpointReader`
(``name``, ``model_dir``, ``config``, ``tensor_names``, ``shape``, ``dtype``, ``nbytes``, ``get``,
``close``) over tensors in a dict. ``model_dir`` is a small folder with everything a merged model
has besides its weights (``config.json``, tokenizer files, chat template), so tokenizer and chat
template code reads it as it reads a model on disk. :class:`FolderFiles` writes that folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from merge_engine.errors import CheckpointError


class MemoryModel:
    """A model's tensors in memory (``tensors``), with its files in ``model_dir``.

    ``tensors`` may be None: the model is then known by its plan alone (``shapes``: name ->
    (shape, dtype)), enough to validate and plan the stages that read it; ``get`` raises. The
    tensors are not copied on construction and must not be modified afterwards; ``get`` returns
    a tensor the caller owns (a copy when ``to`` would hand out the stored one). ``close`` is a
    no-op: the owner (:class:`merge_engine.multistage.StagePipeline`) drops the tensors with
    :meth:`release`, so wrapping readers (a LoRA adapter on top) cannot free them early.
    """

    def __init__(self, name: str, model_dir: Path | str, config: Mapping[str, Any],
                 tensors: Mapping[str, torch.Tensor] | None = None,
                 shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> None:
        if tensors is None and shapes is None:
            raise ValueError("a MemoryModel needs tensors or their shapes")
        self.name = name
        self.model_dir = Path(model_dir)
        self._config = json.loads(json.dumps(dict(config)))
        self._tensors = dict(tensors) if tensors is not None else None
        if tensors is not None:
            shapes = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        self._shapes = dict(shapes)
        self._names = tuple(sorted(self._shapes))

    @property
    def has_data(self) -> bool:
        """Whether the tensors are held (False: known by plan alone, or released)."""
        return self._tensors is not None

    @property
    def config(self) -> dict[str, Any]:
        """The merged config.json (a copy: callers may modify it)."""
        return json.loads(json.dumps(self._config))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[1]

    def nbytes(self, name: str) -> int:
        shape, dtype = self._entry(name)
        numel = 1
        for n in shape:
            numel *= n
        return numel * dtype.itemsize

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._names)

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` on ``device`` as ``dtype`` (if given), owned by the caller."""
        self._entry(name)
        if self._tensors is None:
            raise CheckpointError(f"model {self.name} is planned but not merged (or was released); "
                                  "merge its stage before reading its tensors")
        stored = self._tensors[name]
        out = stored.to(device=device, dtype=dtype)
        return out.clone() if out.data_ptr() == stored.data_ptr() else out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (not copies: do not modify them)."""
        if self._tensors is None:
            raise CheckpointError(f"model {self.name} holds no tensors; merge its stage first")
        return dict(self._tensors)

    def release(self) -> None:
        """Drop the tensors (metadata stays); later ``get`` calls raise."""
        self._tensors = None

    def close(self) -> None:
        """Nothing: the tensors live until :meth:`release` (see the class docstring)."""

    def __enter__(self) -> MemoryModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        held = "held" if self._tensors is not None else "not held"
        return f"MemoryModel({self.name!r}, {len(self._names)} tensors, {held})"

    def _entry(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        try:
            return self._shapes[name]
        except KeyError:
            raise CheckpointError(f"model {self.name} has no tensor {name!r}; check the name") from None


class FolderFiles:
    """The non-weight part of :class:`merge_engine.io.writer.OutputWriter` (``write_json``,
    ``write_text``, ``copy_files``), writing straight into an existing folder ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.root / name).write_text(text, encoding="utf-8")

    def copy_files(self, src_dir: Path | str, names: list[str]) -> None:
        for name in names:
            src = Path(src_dir) / name
            if not src.is_file():
                raise CheckpointError(f"{src} does not exist; check the source model directory")
            shutil.copyfile(src, self.root / name)
