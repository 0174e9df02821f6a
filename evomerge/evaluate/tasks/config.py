"""Evaluation config: which lm-eval tasks make up the fitness signal, and how to run them.

``EvalConfig`` and ``TaskSpec`` are frozen pydantic models. Short forms are accepted on input:
a task may be ``"name"``, ``"name:weight"`` or a mapping; ``tasks`` may be one comma-separated
string. Field-level and cross-field problems are all reported together in one
``pydantic.ValidationError`` (a ``ValueError``). Checks that need the task catalog (does the task
exist, does it produce the metric) live in :func:`evomerge.evaluate.tasks.validate.validate_eval_config`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ProblemsError
from evomerge.evaluate.backends import backend as registered_backend
from merge_engine.dtypes import MODEL_DTYPE_NAMES

#: ``eval_tasks/`` at the repository root: always searched for local task YAMLs.
REPO_EVAL_TASKS = Path(__file__).resolve().parents[3] / "eval_tasks"
PRESET_DIR = REPO_EVAL_TASKS / "presets"

#: Keyword arguments of ``lm_eval.evaluator.evaluate`` a config may set through ``lm_eval_args``.
LM_EVAL_ARG_NAMES = frozenset(
    {
        "bootstrap_iters",
        "system_instruction",
        "fewshot_as_multiturn",
        "gen_kwargs",
        "confirm_run_unsafe_code",
        "cache_requests",
        "fewshot_random_seed",
    }
)


class EvalConfigError(ProblemsError, ValueError):
    """An evaluation config cannot run; ``problems`` lists every problem found, one line each
    (the problem, then the fix). Also a ``ValueError``: callers and pydantic validators that
    catch ``ValueError`` for bad input (e.g. ``load_preset`` inside a model validator) see it."""


class TaskSpec(BaseModel):
    """One lm-eval task (or group) in the fitness signal.

    ``metric`` is ``"name"`` or ``"name,filter"`` as lm-eval reports it (``"acc"``,
    ``"exact_match,strict-match"``); ``None`` means the task's first metric under its first
    filter. ``weight`` may be negative for a lower-is-better metric (e.g. perplexity); it may not
    be zero. ``num_fewshot=None`` keeps the task's own default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    weight: float = 1.0
    metric: str | None = None
    num_fewshot: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_task_string(value)
        return value

    @field_validator("weight")
    @classmethod
    def _finite_nonzero(cls, w: float) -> float:
        if not math.isfinite(w) or w == 0:
            raise ValueError(f"weight must be a finite non-zero number, got {w!r}")
        return w

    @field_validator("name")
    @classmethod
    def _no_spaces(cls, name: str) -> str:
        if name != name.strip() or "," in name:
            raise ValueError(f"task name {name!r} has spaces or commas; give one name per task")
        return name


def parse_task_string(text: str) -> dict[str, Any]:
    """``"name"`` or ``"name:weight"`` → TaskSpec fields. Raises ``ValueError`` on a bad weight."""
    name, sep, weight = text.strip().rpartition(":")
    if not sep:
        return {"name": text.strip()}
    try:
        return {"name": name.strip(), "weight": float(weight)}
    except ValueError:
        raise ValueError(
            f"task {text!r}: expected 'name' or 'name:weight' with a number after ':'"
        ) from None


class EvalConfig(BaseModel):
    """How candidates are scored. Frozen; build a new one with ``model_copy(update=...)``.

    - ``limit``: ``None`` = all docs; an int N = a seeded random subset of N docs per leaf task;
      a float in (0, 1) = that fraction of each leaf task. The subset depends only on ``seed``
      and the task name, so every candidate of a run sees the same docs.
    - ``include_paths``: extra folders of lm-eval task YAMLs; the repo's ``eval_tasks/`` is
      always searched first (see :func:`effective_include_paths`).
    - ``lm_eval_args``: extra keyword arguments for ``lm_eval.evaluator.evaluate`` (allowed
      keys: ``LM_EVAL_ARG_NAMES``).
    - ``vllm_args``: extra keyword arguments for ``vllm.LLM`` (e.g. ``max_model_len``).
    - Placement on GPUs (see :mod:`evomerge.devices` for each backend's memory plan):
      ``device_map: auto`` (hf) spreads a model too big for one GPU over all visible GPUs;
      ``max_memory`` (hf, with ``device_map: auto``; GPU index or ``cpu`` -> bytes or a size such
      as ``70GiB``) caps each device, the rest spilling to CPU memory (merged in place through
      accelerate's CPU store, :mod:`evomerge.offload`; a spill to disk is refused);
      ``load_in: 8bit|4bit`` (hf, CUDA, bitsandbytes) scores a quantized copy of each merged
      model, the merge itself stays at full precision; ``gpu_memory_utilization`` (vllm, the
      share of the GPU the engine reserves; vLLM's default when unset) and
      ``tensor_parallel_size`` (vllm, GPUs per engine).
    - ``allow_task_code``: a local task whose YAML runs Python code (``!function``) is refused
      unless this is true (lm-eval imports that code when it builds the task); lm-eval's own
      built-in tasks are installed code and need no opt-in.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    backend: str = "hf"  # a name in evomerge.evaluate.backends.BACKENDS
    limit: int | float | None = None
    seed: int = 0
    batch_size: int = Field(default=8, ge=1)
    dtype: Literal[("auto", *MODEL_DTYPE_NAMES)] = "auto"
    apply_chat_template: bool = False
    include_paths: tuple[str, ...] = ()
    lm_eval_args: dict[str, Any] = Field(default_factory=dict)
    vllm_args: dict[str, Any] = Field(default_factory=dict)
    device_map: Literal["auto"] | None = None
    max_memory: dict[int | Literal["cpu"], int | str] | None = None
    load_in: Literal["8bit", "4bit"] | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    allow_task_code: bool = False

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_task_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part for part in value.split(",") if part.strip())
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        return registered_backend(name).name

    @field_validator("max_memory", mode="before")
    @classmethod
    def _gpu_indices(cls, value: Any) -> Any:
        # YAML reads `0:` as an int but `"0":`/`cuda:0:` as strings; accelerate wants ints
        if isinstance(value, dict):
            return {_memory_device(k): v for k, v in value.items()}
        return value

    @field_validator("max_memory")
    @classmethod
    def _sizes(cls, value: dict[int | str, int | str] | None) -> Any:
        for device, size in (value or {}).items():
            if isinstance(size, bool) or (isinstance(size, int) and size <= 0) or (
                    isinstance(size, str) and not _SIZE.fullmatch(size.strip())):
                raise ValueError(f"max_memory[{device!r}] = {size!r} is not a size; give bytes or "
                                 "a number with a unit, e.g. 70GiB or 500MB")
        return value

    @field_validator("include_paths", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            return (str(value),)
        return tuple(str(p) for p in value)

    @model_validator(mode="after")
    def _cross_field(self) -> EvalConfig:
        problems: list[str] = []
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"tasks listed more than once: {dupes}; list each task once")
        if self.limit is not None:
            if isinstance(self.limit, bool) or self.limit <= 0:
                problems.append(f"limit must be > 0, got {self.limit!r}")
            elif isinstance(self.limit, float) and not self.limit < 1:
                problems.append(
                    f"a float limit is a fraction and must be < 1, got {self.limit!r}; "
                    "give an int for a number of docs"
                )
        unknown = sorted(set(self.lm_eval_args) - LM_EVAL_ARG_NAMES)
        if unknown:
            problems.append(
                f"unknown lm_eval_args {unknown}; allowed: {sorted(LM_EVAL_ARG_NAMES)}"
            )
        problems += _placement_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", re.IGNORECASE)


def _memory_device(key: Any) -> Any:
    """A ``max_memory`` key as accelerate takes it: a GPU index (int) or ``cpu``."""
    text = str(key).strip().lower()
    text = text.removeprefix("cuda:")
    if text.isdigit():
        return int(text)
    if text == "cpu":
        return "cpu"
    raise ValueError(f"max_memory key {key!r} is not a device; use GPU indices (0, 1, ...) and cpu")


def _placement_problems(cfg: EvalConfig) -> list[str]:
    """Device/memory fields set for a backend that does not use them."""
    problems = []
    if cfg.backend != "hf":
        for name in ("device_map", "load_in", "max_memory"):
            if getattr(cfg, name) is not None:
                problems.append(f"{name} is an hf backend setting; remove it or set backend: hf "
                                "(vLLM quantizes through vllm_args: {quantization: ...})")
    if cfg.backend != "vllm":
        if cfg.gpu_memory_utilization is not None or cfg.tensor_parallel_size != 1:
            problems.append("gpu_memory_utilization and tensor_parallel_size are vllm backend "
                            "settings; remove them or set backend: vllm (hf: device_map: auto)")
    if cfg.max_memory is not None and cfg.device_map is None and cfg.backend == "hf":
        problems.append("max_memory caps what device_map: auto puts on each device; add "
                        "device_map: auto (or remove max_memory)")
    if cfg.load_in is not None and cfg.device_map is not None:
        problems.append("load_in places the quantized copy on the run's GPU; remove device_map "
                        "(or load_in, to spread a full-precision model over several GPUs)")
    clash = sorted({"gpu_memory_utilization", "tensor_parallel_size"} & set(cfg.vllm_args))
    if clash:
        problems.append(f"vllm_args sets {clash}; set them as eval config fields instead")
    return problems


def effective_include_paths(cfg: EvalConfig) -> list[Path]:
    """The repo's ``eval_tasks/`` (if present) followed by ``cfg.include_paths``, resolved."""
    paths = [REPO_EVAL_TASKS] if REPO_EVAL_TASKS.is_dir() else []
    for p in cfg.include_paths:
        path = Path(p).expanduser().resolve()
        if path not in paths:
            paths.append(path)
    return paths


def available_presets() -> list[str]:
    """Names of the YAML presets under ``eval_tasks/presets/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, **overrides: Any) -> EvalConfig:
    """Load ``eval_tasks/presets/<name>.yaml`` (or a YAML path) as an :class:`EvalConfig`.

    ``overrides`` replace top-level fields (e.g. ``limit=50``, ``backend="vllm"``).
    """
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise EvalConfigError(
            f"eval preset {name!r} not found; available presets: {available_presets()}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("description", None)
    data.update(overrides)
    return EvalConfig.model_validate(data)


def build_eval_config(*, tasks: Any = None, preset: str | None = None, include_paths: Sequence[str] = (),
                      num_fewshot: int | None = None, **overrides: Any) -> EvalConfig:
    """An :class:`EvalConfig` from command-line style options: a ``preset`` (or ``tasks``), then
    the ``overrides`` given (None values are skipped, so a preset keeps its own), extra
    ``include_paths`` after the preset's, and ``num_fewshot`` for every task. Every schema
    problem is raised in one :class:`EvalConfigError`."""
    from pydantic import ValidationError

    from evomerge.errors import validation_problems

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = load_preset(preset, **given) if preset else EvalConfig(tasks=tasks, **given)
        if include_paths:
            cfg = EvalConfig.model_validate(
                {**cfg.model_dump(), "include_paths": (*cfg.include_paths, *include_paths)})
        if num_fewshot is not None:
            specs = tuple(TaskSpec(**{**t.model_dump(), "num_fewshot": num_fewshot}) for t in cfg.tasks)
            cfg = EvalConfig.model_validate({**cfg.model_dump(), "tasks": specs})
    except ValidationError as err:
        raise EvalConfigError(validation_problems(err)) from None
    return cfg
