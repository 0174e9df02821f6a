"""Per-candidate evaluation overhead on the zoo: everything but the forward passes, as % of a trial.

    .venv/bin/python benchmarks/eval_overhead.py [--candidates 6] [--out results/benchmarks/eval_overhead.md]

The loop measured is the search's own: the demo space (``search_spaces/zoo_demo.yaml``) on the
demo zoo (built if missing), one resident model, ``Candidate.apply`` (in-memory merge) then the
search evaluator, for a stream of seeded random candidates. A trial = apply + evaluation.
Forward time is measured with hooks on the model's top-level ``forward`` (which every lm-eval
call and every generation step goes through); evaluation overhead = evaluation wall - forward.

Rows compare our evaluator with the plain lm-eval pieces it replaces, on the same candidates:

- evomerge (HFEvaluator): tasks, doc subset and requests built once; encodings remembered;
- plain HFLM wrapper: the same, but lm-eval's own ``HFLM`` (re-tokenizes every request per candidate);
- rebuild per candidate: a new evaluator per candidate (task index, datasets, requests, HFLM).

Two task sets: the demo's multiple-choice search tasks (loglikelihood, 200 docs per task) and
the zoo's generate_until tasks (greedy exact match, 50 docs per task).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


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


def candidates(space, n: int, seed: int):
    """``n`` seeded random recipes from the space (uniform within each parameter's range)."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import FixedTrial

    from evomerge.space import distributions, trial_recipe

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        params = {}
        for name, dist in distributions(space).items():
            if isinstance(dist, CategoricalDistribution):
                params[name] = rng.choice(dist.choices)
            else:
                params[name] = rng.uniform(dist.low, dist.high)
        out.append(trial_recipe(space, FixedTrial(params)))
    return out


def measure(bench, evaluator, recipes, make_evaluator=None):
    """Median seconds per candidate: apply, evaluation, forward; the first candidate is a warm-up."""
    timer = ForwardTimer(bench.model)  # hooks stay; each measure resets the total
    rows = []
    for i, recipe in enumerate(recipes):
        t0 = time.perf_counter()
        bench.apply(recipe)
        t1 = time.perf_counter()
        timer.total = 0.0
        ev = make_evaluator() if make_evaluator else evaluator
        result = ev.evaluate(bench.model, bench.tokenizer)
        t2 = time.perf_counter()
        if i:
            rows.append((t1 - t0, t2 - t1, timer.total, result.score))
    med = [statistics.median(r[j] for r in rows) for j in range(3)]
    return med, [r[3] for r in rows]


def run(args) -> list[dict]:
    import torch
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate import EvalConfig, TaskCatalog, make_evaluator
    from evomerge.search.run import resident_candidate
    from evomerge.space import load_space
    from evomerge.zoo import build_zoo, default_zoo_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    zoo = Path(args.zoo) if args.zoo else default_zoo_dir("demo")
    if not args.zoo:
        build_zoo(zoo, variant="demo", log=lambda m: print(m, file=sys.stderr))
    space = load_space(REPO / "search_spaces" / "zoo_demo.yaml", variables={"ZOO": str(zoo)})
    recipes = candidates(space, args.candidates + 1, seed=0)
    task_sets = {
        "multiple choice (demo search tasks, 3 x 200 docs)": space.eval,
        "generate_until (zoo *_search_gen, 3 x 50 docs)": EvalConfig(
            tasks=["zoo_add_search_gen", "zoo_sort_search_gen", "zoo_shift_search_gen"],
            limit=50, batch_size=64, seed=0),
    }
    out = []
    with resident_candidate(space) as bench:
        for label, cfg in task_sets.items():
            catalog = TaskCatalog.for_config(cfg)
            ours = make_evaluator(cfg, catalog=catalog)
            (apply_s, eval_s, fwd_s), scores = measure(bench, ours, recipes)
            out.append(dict(tasks=label, way="evomerge (HFEvaluator)", apply=apply_s, eval=eval_s,
                            forward=fwd_s, scores=scores))

            plain = make_evaluator(cfg, catalog=catalog)
            plain._lm = HFLM(pretrained=bench.model, tokenizer=bench.tokenizer,
                             batch_size=cfg.batch_size)
            plain._lm_key = (id(bench.model), id(bench.tokenizer))
            (apply_s, eval_s, fwd_s), plain_scores = measure(bench, plain, recipes)
            out.append(dict(tasks=label, way="plain lm-eval HFLM wrapper", apply=apply_s,
                            eval=eval_s, forward=fwd_s, scores=plain_scores))

            (apply_s, eval_s, fwd_s), rebuilt = measure(
                bench, None, recipes, make_evaluator=lambda: make_evaluator(cfg, catalog=catalog))
            out.append(dict(tasks=label, way="new evaluator per candidate", apply=apply_s,
                            eval=eval_s, forward=fwd_s, scores=rebuilt))
            if not (scores == plain_scores == rebuilt):
                raise SystemExit(f"scores differ between the ways on {label}: {scores} / "
                                 f"{plain_scores} / {rebuilt}")
            for ev in (ours, plain):
                ev.close()
    return out


def to_markdown(rows: list[dict], args) -> str:
    load = os.getloadavg()[0]
    lines = [
        "# Evaluation overhead per candidate on the zoo (HF backend, CPU)",
        "",
        f"Generated by `benchmarks/eval_overhead.py --candidates {args.candidates} --threads "
        f"{args.threads}` on {time.strftime('%Y-%m-%d %H:%M')}. The search's own loop: demo zoo "
        "(Llama, 2 layers, hidden 128, fp32), `search_spaces/zoo_demo.yaml` (task arithmetic, one "
        "weight per expert and layer), one resident model; per candidate `Candidate.apply` (the "
        "in-memory merge) then the evaluation. Medians over "
        f"{args.candidates} seeded random candidates after one warm-up. Forward = time inside "
        "`model.forward`; evaluation overhead = evaluation wall − forward; % of trial = "
        "overhead / (apply + evaluation). Every way gave identical scores on every candidate.",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch threads "
        f"{args.threads}, load average {load:.1f} at the end.",
        "",
        "| tasks | way | apply s | evaluation s | forward s | eval overhead s | overhead % of trial (target < 10) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        over = r["eval"] - r["forward"]
        pct = 100 * over / (r["apply"] + r["eval"])
        mark = (" ✅" if pct < 10 else " ❌") if r["way"].startswith("evomerge") else ""
        lines.append(f"| {r['tasks']} | {r['way']} | {r['apply']:.3f} | {r['eval']:.3f} | "
                     f"{r['forward']:.3f} | {over:.3f} | {pct:.1f}{mark} |")
    lines += [
        "",
        "What the overhead is: lm-eval's request batching and sorting (Collator), padding and "
        "log-softmax/greedy checks per request, metric aggregation and bootstrapped stderr; for "
        "generate_until also HF `generate`'s per-step Python (logits processors, stop-string "
        "checks). What is no longer in it: building tasks, reading datasets, building requests "
        "(built once per run) and tokenizing prompts (remembered per run: the difference between "
        "the first two rows).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--zoo", help="an already built zoo directory (default: build/reuse the demo zoo)")
    parser.add_argument("--out", type=Path, default=REPO / "results/benchmarks/eval_overhead.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="eval-overhead-hf-"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run(args)
    text = to_markdown(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
