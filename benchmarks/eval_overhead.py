"""Per-candidate evaluation overhead: everything but the model's forward passes, as % of a trial.

    .venv/bin/python benchmarks/eval_overhead.py [--candidates 5] [--out results/benchmarks/eval_overhead.md]

Compares three ways to score a stream of candidates on the smoke tasks (tiny 2-layer Llama, CPU,
one torch thread):

- reuse:        one HFEvaluator (tasks and the HFLM wrapper built once), weights changed in place;
- rebuild:      a new HFEvaluator per candidate (task index, task objects, datasets, HFLM);
- simple_eval:  ``lm_eval.simple_evaluate`` per candidate with a prebuilt local TaskManager.

Forward time is measured with hooks on the model's top-level forward; overhead = wall - forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


class ForwardTimer:
    """Accumulates wall time spent inside ``model.forward`` (hooks; nesting not expected)."""

    def __init__(self, model) -> None:
        self.total = 0.0
        self._t0 = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t0


def perturb(model, seed: int) -> None:
    """A new candidate: small seeded noise written into the weights in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3)


def run(candidates: int, tasks: str, limit: int | None) -> list[tuple[str, float, float]]:
    import torch
    from fixtures import make_tiny_llama
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate import EvalConfig, TaskCatalog
    from evomerge.evaluate.config import REPO_EVAL_TASKS
    from evomerge.evaluate.hf import HFEvaluator, load_model_dir

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    model_dir = make_tiny_llama(work / "m", seed=0, hidden=256, heads=4, intermediate=512)
    model, tok = load_model_dir(model_dir)
    timer = ForwardTimer(model)
    cfg = EvalConfig(tasks=tasks, batch_size=8, limit=limit)
    rows = []

    def measure(name: str, one_candidate) -> None:
        walls, fwds = [], []
        for i in range(candidates + 1):  # the first call warms caches and is dropped
            perturb(model, i)
            timer.total = 0.0
            t0 = time.perf_counter()
            one_candidate()
            if i:
                walls.append(time.perf_counter() - t0)
                fwds.append(timer.total)
        rows.append((name, statistics.median(walls), statistics.median(fwds)))

    t0 = time.perf_counter()
    evaluator = HFEvaluator(cfg)
    build_once = time.perf_counter() - t0
    measure("reuse (one HFEvaluator)", lambda: evaluator.evaluate(model, tok))
    measure("rebuild (new HFEvaluator per candidate)", lambda: HFEvaluator(cfg).evaluate(model, tok))
    tm = TaskCatalog([REPO_EVAL_TASKS]).manager
    names = [t.name for t in cfg.tasks]
    measure(
        "lm_eval.simple_evaluate per candidate",
        lambda: simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tok, batch_size=8),
            tasks=names, task_manager=tm, limit=limit, log_samples=False, bootstrap_iters=1000,
        ),
    )
    rows.append(("one-off: build tasks (index + datasets)", build_once, 0.0))
    return rows


def to_markdown(rows, candidates: int, tasks: str, limit: int | None) -> str:
    lines = [
        "# Evaluation overhead per candidate (HF backend, CPU)",
        "",
        f"Tiny Llama (2 layers, hidden 256, fp32), tasks `{tasks}`, limit {limit}, batch 8, one torch "
        f"thread; median of {candidates} candidates after one warm-up. Overhead = wall time minus "
        "time inside `model.forward`. Command: `.venv/bin/python benchmarks/eval_overhead.py`.",
        f"Machine: {os.cpu_count()} CPU cores, shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end), so absolute times are noisy; ratios are the signal.",
        "",
        "| way | wall s / candidate | forward s | overhead s | overhead % of trial |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, wall, fwd in rows:
        if fwd:
            lines.append(
                f"| {name} | {wall:.3f} | {fwd:.3f} | {wall - fwd:.3f} | {100 * (wall - fwd) / wall:.1f} |"
            )
        else:
            lines.append(f"| {name} | {wall:.3f} | - | - | - |")
    lines += [
        "",
        "Notes: \"reuse\" keeps the Task objects, the seeded doc subset, the built requests "
        "(prompts do not depend on the weights) and the HFLM wrapper; what remains is HF "
        "`generate`'s per-step Python, lm-eval's batching/sorting and metric computation. "
        "\"rebuild\" adds task indexing, dataset reading and request building per candidate. "
        "`simple_evaluate` additionally collects environment info (git, pip, torch) on every call.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--tasks", default="smoke_mc,smoke_gen")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "results/benchmarks/eval_overhead.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="eval-overhead-hf-"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run(args.candidates, args.tasks, args.limit)
    text = to_markdown(rows, args.candidates, args.tasks, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
