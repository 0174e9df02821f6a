"""Where the transformer layer stack sits in a checkpoint, found from tensor names alone.

No per-architecture tables: the stack is the dotted prefix ``P`` such that names ``P<i>.<rest>``
exist for every i in 0..N-1 (the most populous such prefix, checked against config.json). This
covers ``model.layers.N.`` (Llama, Mistral, Qwen2/3, Gemma, Phi-3), ``transformer.h.N.`` and
``h.N.`` (GPT-2), ``gpt_neox.layers.N.`` (GPT-NeoX) and other HF layouts alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from merge_engine.errors import CheckpointError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Name components that mark vocabulary-sized tensors (input embeddings and output heads).
EMBEDDING_MARKERS = ("embed_tokens", "wte", "embed_in", "embed_out", "lm_head", "word_embeddings", "tok_embeddings")
OUTPUT_HEAD_MARKERS = ("lm_head", "embed_out")


def num_layers_from_config(config: Mapping[str, Any]) -> int | None:
    """The layer count config.json declares (top level, else ``text_config``), or None."""
    for scope in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def with_num_layers(config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """A copy of ``config`` declaring ``num_layers`` layers: every layer-count key present is
    rewritten, at the top level and in ``text_config`` (nested dicts are copied, not shared)."""
    out = dict(config)
    for key in LAYER_COUNT_KEYS:
        if key in out:
            out[key] = num_layers
    if isinstance(out.get("text_config"), Mapping):
        out["text_config"] = with_num_layers(out["text_config"], num_layers)
    return out


def is_output_head(name: str) -> bool:
    """True for output-head tensors (``lm_head``, ``embed_out``), which come after the layer stack."""
    return any(marker in part for part in name.split(".") for marker in OUTPUT_HEAD_MARKERS)


def is_embedding_name(name: str) -> bool:
    """True for vocabulary-sized tensors: input embeddings and LM heads (``embed_tokens``, ``wte``,
    ``embed_in``, ``lm_head``, ``embed_out``, ...), by substring match on the dotted components."""
    return any(marker in part for part in name.split(".") for marker in EMBEDDING_MARKERS)


@dataclass(frozen=True)
class LayerLayout:
    """The layer stack of one checkpoint: tensors named ``{prefix}{i}.{suffix}``, 0 <= i < num_layers.

    Names are parsed by pattern, so indices past ``num_layers`` are read too (a layer-stacking
    merge outputs more layers than its inputs have). ``suffixes`` is the sorted union of per-layer
    suffixes. A checkpoint without a stack has ``prefix == ""`` and ``num_layers == 0``.
    """

    prefix: str
    num_layers: int
    suffixes: tuple[str, ...]

    def layer_of(self, name: str) -> int | None:
        """The layer index of ``name``, or None for tensors outside the stack."""
        split = self._split(name)
        return None if split is None else split[0]

    def suffix_of(self, name: str) -> str | None:
        """``name`` without ``{prefix}{i}.`` (e.g. ``mlp.up_proj.weight``), or None outside the stack."""
        split = self._split(name)
        return None if split is None else split[1]

    def rename(self, name: str, layer: int) -> str:
        """The same tensor at layer ``layer`` (raises ValueError for names outside the stack)."""
        split = self._split(name)
        if split is None:
            raise ValueError(f"tensor {name} is not in the layer stack {self.prefix}<i>.")
        return f"{self.prefix}{layer}.{split[1]}"

    def is_embedding(self, name: str) -> bool:
        """True for input embeddings and output heads outside the layer stack."""
        return self._split(name) is None and is_embedding_name(name)

    def _split(self, name: str) -> tuple[int, str] | None:
        if not self.num_layers or not name.startswith(self.prefix):
            return None
        index, dot, suffix = name[len(self.prefix) :].partition(".")
        if not (dot and suffix and index.isdigit()):
            return None
        return int(index), suffix


def detect_layout(tensor_names: Iterable[str], config: Mapping[str, Any]) -> LayerLayout:
    """Find the layer stack in ``tensor_names``; raise CheckpointError if config.json disagrees.

    Candidates are prefixes ``X.`` followed by an integer component; a candidate qualifies when
    its indices are exactly 0..N-1. Among candidates whose N matches the config's layer count (if
    it declares one), the one with most tensor names wins.
    """
    names = list(tensor_names)
    indices: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                prefix = ".".join(parts[:i]) + "." if i else ""
                indices.setdefault(prefix, set()).add(int(part))
                counts[prefix] = counts.get(prefix, 0) + 1
    dense = {p: len(ix) for p, ix in indices.items() if ix == set(range(len(ix)))}
    expected = num_layers_from_config(config)
    pool = [p for p in dense if expected is None or dense[p] == expected]
    if not pool:
        if expected:
            found = ", ".join(f"{p}<i> x{n}" for p, n in sorted(dense.items())) or "no numbered tensors"
            raise CheckpointError(
                f"config.json declares {expected} layers but the tensor names show {found}; "
                "the config does not match the weights: re-download or fix config.json"
            )
        return LayerLayout(prefix="", num_layers=0, suffixes=())
    prefix = max(pool, key=lambda p: (counts[p], -len(p)))
    layout = LayerLayout(prefix=prefix, num_layers=dense[prefix], suffixes=())
    suffixes = {s for s in map(layout.suffix_of, names) if s is not None}
    return LayerLayout(prefix, layout.num_layers, tuple(sorted(suffixes)))


# -- compatibility between models ------------------------------------------------------------------


class CheckpointInfo(Protocol):
    """What check_compatible needs of a model: CheckpointReader satisfies it, as does StaticInfo."""

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def tensor_names(self) -> tuple[str, ...]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class StaticInfo:
    """A CheckpointInfo from plain data (for validating without files, and for tests)."""

    config: Mapping[str, Any]
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.shapes))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name])


def _as_info(value: CheckpointInfo | tuple) -> CheckpointInfo:
    if isinstance(value, tuple):
        _names, config, shapes = value
        return StaticInfo(config, {n: tuple(shape) for n, shape in shapes.items()})
    return value


def _architecture(config: Mapping[str, Any]) -> str | None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs:
        return ",".join(map(str, archs))
    model_type = config.get("model_type")
    return str(model_type) if model_type else None


def _show(items: Iterable[str], limit: int = 3) -> str:
    items = sorted(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_compatible(models: Mapping[str, CheckpointInfo | tuple]) -> list[str]:
    """Problems that stop these models from being merged tensor by tensor, one line each.

    ``models`` maps how problems name each model to a CheckpointInfo (a CheckpointReader, a
    StaticInfo) or to a plain ``(tensor_names, config, {name: shape})`` tuple.

    Each model is compared with the first one: architecture (``architectures``, else
    ``model_type``), per-layer tensor suffixes, tensors outside the stack (vocabulary tensors
    excepted: tied and untied heads mix), and shapes of shared tensors (vocabulary tensors may
    differ in their first, vocabulary, dimension). Layer counts may differ (slices pick ranges).
    Each problem names the model and the tensor. An empty list means compatible.
    """
    problems: list[str] = []
    items = [(key, _as_info(value)) for key, value in models.items()]
    layouts: dict[str, LayerLayout] = {}
    for key, info in items:
        try:
            layouts[key] = detect_layout(info.tensor_names, info.config)
        except CheckpointError as exc:
            problems.append(f"model {key}: {exc}")
    if len(items) < 2 or problems:
        return problems
    ref_key, ref = items[0]
    ref_layout = layouts[ref_key]
    for key, info in items[1:]:
        problems += _compare(ref_key, ref, ref_layout, key, info, layouts[key])
    return problems


def _compare(
    ref_key: str, ref: CheckpointInfo, ref_layout: LayerLayout, key: str, info: CheckpointInfo, layout: LayerLayout
) -> list[str]:
    problems: list[str] = []
    arch_a, arch_b = _architecture(ref.config), _architecture(info.config)
    if arch_a and arch_b and arch_a != arch_b:
        problems.append(
            f"model {key} is {arch_b} but model {ref_key} is {arch_a}; merge models of the same architecture"
        )
    if set(layout.suffixes) != set(ref_layout.suffixes):
        extra = set(layout.suffixes) - set(ref_layout.suffixes)
        lacking = set(ref_layout.suffixes) - set(layout.suffixes)
        detail = "; ".join(
            s for s in (extra and f"has extra {_show(extra)}", lacking and f"lacks {_show(lacking)}") if s
        )
        problems.append(
            f"model {key} has different per-layer tensors than model {ref_key} ({detail}); "
            "merge models of the same architecture"
        )
    outer_a = {n for n in ref.tensor_names if ref_layout.layer_of(n) is None and not ref_layout.is_embedding(n)}
    outer_b = {n for n in info.tensor_names if layout.layer_of(n) is None and not layout.is_embedding(n)}
    if outer_a != outer_b:
        diff = outer_a.symmetric_difference(outer_b)
        problems.append(
            f"model {key} and model {ref_key} differ in tensors outside the layer stack ({_show(diff)}); "
            "merge models of the same architecture"
        )
    problems += _shape_problems(ref_key, ref, ref_layout, key, info, layout)
    return problems


def _shape_problems(
    ref_key: str, ref: CheckpointInfo, ref_layout: LayerLayout, key: str, info: CheckpointInfo, layout: LayerLayout
) -> list[str]:
    # Tensors pair up by (layer, suffix) inside the stack and by name outside it; layers past the
    # shallower model are skipped. A per-layer mismatch is reported once per suffix.
    ref_by_key = {_pair_key(n, ref_layout): n for n in ref.tensor_names}
    seen: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], int]] = {}
    for name in info.tensor_names:
        pair = _pair_key(name, layout)
        ref_name = ref_by_key.get(pair)
        if ref_name is None:
            continue
        a, b = tuple(ref.shape(ref_name)), tuple(info.shape(name))
        if a == b or (layout.is_embedding(name) and len(a) == len(b) and a[1:] == b[1:]):
            continue
        group = pair[1]
        first = seen.get(group)
        seen[group] = (first[0], first[1], first[2], first[3] + 1) if first else (name, a, b, 1)
    problems = []
    for name, a, b, count in seen.values():
        where = f" (in {count} layers)" if count > 1 else ""
        problems.append(
            f"tensor {name} has shape {list(b)} in model {key} but {list(a)} in model {ref_key}{where}; "
            "merge models of the same size"
        )
    return problems


def _pair_key(name: str, layout: LayerLayout) -> tuple[int | None, str]:
    split = layout._split(name)
    return (None, name) if split is None else split
