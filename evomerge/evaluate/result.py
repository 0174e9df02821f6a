"""Evaluation results: per-task scores, the weighted fitness, and a plain-text table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskScore:
    """One task's metric as lm-eval reported it (``metric`` is ``"name,filter"``)."""

    task: str
    metric: str
    value: float
    weight: float
    stderr: float | None = None
    n_samples: int = 0


@dataclass(frozen=True)
class EvalResult:
    """The outcome of scoring one candidate.

    ``score`` is Σ weight·value / Σ|weight| over ``tasks`` (higher is better; a negative weight
    turns a lower-is-better metric into a reward). ``n_samples`` counts evaluated docs over all leaf
    tasks; ``wall_time_s`` covers the whole ``evaluate`` call.
    """

    tasks: tuple[TaskScore, ...]
    n_samples: int
    wall_time_s: float
    backend: str = "hf"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return weighted_score(self.tasks)

    def metric(self, task: str) -> float:
        """The value of ``task``'s metric. Raises ``KeyError`` for an unknown task."""
        for t in self.tasks:
            if t.task == task:
                return t.value
        raise KeyError(f"no task {task!r} in this result; tasks: {[t.task for t in self.tasks]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``score``, ``n_samples``, ``wall_time_s``, ``backend``, ``tasks`` (list)."""
        return {
            "score": self.score,
            "n_samples": self.n_samples,
            "wall_time_s": self.wall_time_s,
            "backend": self.backend,
            "tasks": [asdict(t) for t in self.tasks],
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (``score`` is recomputed, not read)."""
        return cls(
            tasks=tuple(TaskScore(**t) for t in data["tasks"]),
            n_samples=data["n_samples"],
            wall_time_s=data["wall_time_s"],
            backend=data.get("backend", "hf"),
            extra=data.get("extra", {}),
        )


def weighted_score(scores: tuple[TaskScore, ...] | list[TaskScore]) -> float:
    """Σ weight·value / Σ|weight|; NaN if any value is NaN, 0.0 for no tasks."""
    total = sum(abs(s.weight) for s in scores)
    if total == 0:
        return 0.0
    return sum(s.weight * s.value for s in scores) / total


def format_table(result: EvalResult) -> str:
    """A plain-text table: task, metric, value (± stderr), weight, then the weighted score."""
    rows = [("task", "metric", "value", "stderr", "weight", "n")]
    for t in result.tasks:
        stderr = "" if t.stderr is None or math.isnan(t.stderr) else f"{t.stderr:.4f}"
        rows.append((t.task, t.metric, f"{t.value:.4f}", stderr, f"{t.weight:g}", str(t.n_samples)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = {2, 3, 4, 5}

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(rows[0]), rule, *(line(r) for r in rows[1:]), rule]
    out.append(
        f"weighted score: {result.score:.4f}   "
        f"({result.n_samples} samples, {result.wall_time_s:.1f} s, backend {result.backend})"
    )
    return "\n".join(out)
