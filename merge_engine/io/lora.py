"""A base model with a PEFT LoRA adapter applied, read as one model (``base+adapter`` refs).

:class:`LoraReader` wraps the base model's reader and offers the same read interface
(``config``, ``tensor_names``, ``shape``, ``dtype``, ``nbytes``, ``get``, ``close``), so a merge,
on disk or in memory, treats ``base+adapter`` like any other model. What a read returns is what
peft's ``merge_and_unload`` leaves in the model:

- a LoRA pair on module ``M`` (``M.lora_A.weight`` [r, in], ``M.lora_B.weight`` [out, r]) adds
  ``scale * (B @ A)`` to ``M.weight`` (transposed for ``fan_in_fan_out`` layers); on an embedding
  (``M.lora_embedding_A`` [r, rows], ``M.lora_embedding_B`` [dim, r]) it adds ``scale * (B @ A).T``;
- ``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``; ``r`` and ``alpha`` come from
  ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module name, as in peft;
- full tensors the adapter stores (``modules_to_save``, and ``M.base_layer.weight`` that peft
  saves for adapted embeddings) replace the base's tensor of that name.

The sum is computed in float32 (``W.float() + delta``) and rounded once to the base weight's
dtype: the same arithmetic as peft's in-place merge, which upcasts the adapter to float32. An
embedding's update is rounded to the weight's dtype first and then added, as peft's embedding
merge does (the two differ only below float32).
With ``merge_dtype`` (mergekit's ``lora_merge_dtype``: the dtype mergekit loads the base in
before peft merges) every tensor of the adapted model is that dtype: the base's weights are cast
to it first, and an adapted weight is ``W`` (cast) plus the float32 update, summed in the wider of
the two and rounded once to ``merge_dtype``.
Everything that can be checked without tensor data (adapter config, tensor names, ranks,
shapes against the base) is checked on construction, each problem a one-line CheckpointError.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.st_header import read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules in its files
_MERGE_HINT = "merge it into its base with peft (merge_and_unload) and reference the merged directory"
# Config keys whose truthy value means more than W + scale * B @ A (each refused by name).
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
_LOW_RANK = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))$")


@dataclass(frozen=True)
class _Delta:
    """One adapted weight: ``scale * (B @ A)``, transposed when ``transpose``."""

    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool
    embedding: bool  # peft rounds an embedding's update to the weight's dtype before adding it


def read_adapter_config(adapter_dir: Path, name: str) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a LoRA adapter; CheckpointError (one line) if it is
    missing, not JSON, not a LoRA adapter, or asks for something :class:`LoraReader` cannot apply."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"adapter {name}: {adapter_dir} has no {ADAPTER_CONFIG}; "
                              f"point '+' at a PEFT LoRA adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"adapter {name}: {path} is not valid JSON; re-download the adapter") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"adapter {name}: {path} is not a JSON object; re-download the adapter")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"adapter {name} is a {kind} adapter, not LoRA (peft_type LORA); {_MERGE_HINT}")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"adapter {name} uses {what}, which cannot be applied here; {_MERGE_HINT}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"adapter {name}: {ADAPTER_CONFIG} needs a positive number '{key}'; "
                                  "fix or re-download the adapter")
    return config


class LoraReader:
    """``base`` (an open reader) with the LoRA adapter in ``adapter_dir`` applied on every read.

    Takes ownership of ``base``: ``close()`` closes both. ``name`` is how messages name the
    model (default ``<base>+<adapter_dir>``). ``model_dir`` is the base's (config, tokenizer).
    Adapter weights are ``adapter_model.safetensors`` (``adapter_model.bin`` only with
    ``allow_pickle``), read lazily; ``get`` may be called from several threads.
    """

    def __init__(self, base: Any, adapter_dir: Path | str, *, name: str | None = None,
                 allow_pickle: bool = False, merge_dtype: torch.dtype | None = None) -> None:
        self.base = base
        self.merge_dtype = merge_dtype
        self.adapter_dir = Path(adapter_dir)
        self.model_dir = base.model_dir
        self.name = name or f"{base.name}+{adapter_dir}"
        try:
            config = read_adapter_config(self.adapter_dir, self.name)
            self._weights = _AdapterWeights(self.adapter_dir, self.name, allow_pickle)
            self._deltas, self._replaced = self._match(config)
        except BaseException:
            base.close()
            raise

    # -- metadata (no tensor data read) -------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.base.tensor_names

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        own = self.base.dtype(name)
        return self.merge_dtype if self.merge_dtype is not None and own.is_floating_point else own

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    @property
    def adapted(self) -> tuple[str, ...]:
        """Names of the tensors the adapter changes (low-rank or replaced), sorted."""
        return tuple(sorted(set(self._deltas) | set(self._replaced)))

    # -- data ---------------------------------------------------------------------------------

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` of the adapted model (see the module docstring), on ``device`` in ``dtype``."""
        delta = self._deltas.get(name)
        source = self._replaced.get(name)
        own = self.dtype(name)
        if delta is None and source is None:
            return self.base.get(name, device=device, dtype=dtype if self.merge_dtype is None else dtype or own)
        weight = self._weights.get(source).to(own) if source is not None else self.base.get(name).to(own)
        if delta is not None:
            update = self._weights.get(delta.b).float() @ self._weights.get(delta.a).float()
            if delta.transpose:
                update = update.T
            if delta.embedding:
                weight = weight + (update * delta.scale).to(own)
            else:
                weight = (weight.to(torch.promote_types(own, torch.float32)) + update * delta.scale).to(own)
        return weight.to(device=device, dtype=dtype)

    def close(self) -> None:
        """Close the base reader and the adapter's files. Safe to call twice."""
        self._weights.close()
        self.base.close()

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraReader({self.name!r}, {len(self.adapted)} adapted tensors)"

    # -- internals ----------------------------------------------------------------------------

    def _match(self, config: dict[str, Any]) -> tuple[dict[str, _Delta], dict[str, str]]:
        """Pair each adapter tensor with the base tensor it changes; refuse any that fits none."""
        pairs: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        embedding: set[str] = set()
        for key in self._weights.names:
            if not key.startswith(_PREFIX):
                raise CheckpointError(f"adapter {self.name}: tensor {key} lacks the '{_PREFIX}' prefix PEFT "
                                      "writes; this is not a PEFT adapter file")
            inner = key[len(_PREFIX):]
            low_rank = _LOW_RANK.match(inner)
            if low_rank:
                pairs.setdefault(low_rank["module"], {})[low_rank["ab"] or low_rank["eab"]] = key
                if low_rank["eab"]:
                    embedding.add(low_rank["module"])
                continue
            target = inner.replace(".base_layer.", ".")
            if target not in self.base:
                raise CheckpointError(f"adapter {self.name}: tensor {key} names no tensor of the base model "
                                      f"({target}); the adapter was made for another model")
            self._check_shape(key, target, self._weights.shape(key))
            replaced[target] = key
        deltas = {}
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"adapter {self.name}: module {module} has lora_{''.join(ab)} but not its "
                                      "partner; re-download the adapter")
            deltas[module + ".weight"] = self._delta(config, module, ab["A"], ab["B"], module in embedding)
        return deltas, replaced

    def _delta(self, config: dict[str, Any], module: str, a: str, b: str, embedding: bool) -> _Delta:
        target = module + ".weight"
        if target not in self.base:
            raise CheckpointError(f"adapter {self.name}: LoRA on {module} but the base model has no {target}; "
                                  "the adapter was made for another model")
        a_shape, b_shape = self._weights.shape(a), self._weights.shape(b)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(f"adapter {self.name}: LoRA on {module} is not a matrix pair ({a_shape}, "
                                  f"{b_shape}; convolution LoRA?); {_MERGE_HINT}")
        rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
        if a_shape[0] != rank or b_shape[1] != rank:
            raise CheckpointError(f"adapter {self.name}: LoRA on {module} has shapes {a_shape} and {b_shape} but "
                                  f"rank {rank} in {ADAPTER_CONFIG}; re-download the adapter")
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        out = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        self._check_shape(f"LoRA on {module}", target, out)
        alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        return _Delta(a, b, scale, transpose, embedding)

    def _check_shape(self, what: str, target: str, shape: tuple[int, ...]) -> None:
        if tuple(shape) != tuple(self.base.shape(target)):
            raise CheckpointError(f"adapter {self.name}: {what} gives {target} shape {tuple(shape)}, the base has "
                                  f"{tuple(self.base.shape(target))}; the adapter was made for another model")


def _pattern_value(patterns: Any, module: str, default: float) -> Any:
    """peft's per-module override: the first pattern key ``k`` with ``module`` matching ``(.*\\.)?k$``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class _AdapterWeights:
    """The adapter's tensors: names and shapes up front, data on demand."""

    def __init__(self, adapter_dir: Path, name: str, allow_pickle: bool) -> None:
        self._file = adapter_dir / ADAPTER_WEIGHTS
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handle: Any = None
        if self._file.is_file():
            self._shapes = {k: tuple(v.shape) for k, v in read_header(self._file).items()}
        elif (adapter_dir / ADAPTER_PICKLE).is_file():
            if not allow_pickle:
                raise CheckpointError(f"adapter {name} has only pickle weights ({ADAPTER_PICKLE}), which can run code "
                                      "when loaded; convert it to safetensors, or pass allow_pickle=True "
                                      "(--allow-pickle) if you trust it")
            state = torch.load(adapter_dir / ADAPTER_PICKLE, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"adapter {name}: {ADAPTER_PICKLE} is not a flat state dict of tensors")
            self._pickled = state
            self._shapes = {k: tuple(v.shape) for k, v in state.items()}
        else:
            raise CheckpointError(f"adapter {name}: {adapter_dir} has no {ADAPTER_WEIGHTS}; "
                                  "re-download the adapter")
        self.names = tuple(sorted(self._shapes))

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self._file), framework="pt")
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None
        self._pickled = None
