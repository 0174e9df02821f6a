"""How many trials and evaluated samples does each sampler need to find a good merge?

    python benchmarks/search_efficiency.py                      # demo zoo, 5 seeds, ~30-60 min
    python benchmarks/search_efficiency.py --seeds 2 --trials 12 --reference-trials 30   # quick look
    python benchmarks/search_efficiency.py --limit 40 --cheap-limit 10     # cheaper evaluations

For each sampler (CMA-ES, TPE, GP, random, and our default: the space's default sampler, GP for
this 6-parameter space, with cheap-first pruning, and CMA-ES with cheap-first pruning) and
each seed, a search runs on the demo zoo's space without start points (so samplers are compared
on what they propose themselves). A long CMA-ES run (plus every run's best) sets the reference
best score B. Reported per sampler, as median [min-max] over seeds:

* trials (and evaluated samples) until a completed trial scores >= 0.95·B;
* the same for 95 % of the way from the best input model to B (a stricter bar: on a zoo where
  any reasonable merge is close to B, 0.95·B is reached almost at once);
* the best score within the budget.

A run that never reaches a bar counts as the full budget and is marked with ">". Every candidate
shares one resident model and one set of built lm-eval tasks, so the loop measured here is the
real one (merge in place → evaluate). Writes results/benchmarks/search_efficiency.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = ("default", "cmaes+pruning", "cmaes", "tpe", "gp", "random")


def run_one(space, bench, sampler: str, seed: int, trials: int, storage_dir: Path) -> list[dict]:
    """One search; returns per finished trial: state, value (COMPLETE only), samples spent so far."""
    from dataclasses import replace

    from evomerge.search.loop import search_loop
    from evomerge.search.samplers import default_sampler
    from evomerge.search.study import open_study

    pruning = space.pruning if sampler in ("default", "cmaes+pruning") else None
    variant = space.model_copy(update={"seed": seed, "pruning": pruning, "start": ()})
    candidate, evaluators = bench
    # the cheap-first rung is used only by the variants with pruning
    evaluators = evaluators if pruning is not None else replace(evaluators, ladder=None)
    study = open_study(variant, storage=f"sqlite:///{storage_dir / f'{sampler}-{seed}.db'}",
                       study_name=f"{sampler}-{seed}",
                       sampler={"default": default_sampler(space),
                                "cmaes+pruning": "cmaes"}.get(sampler, sampler))
    search_loop(study, variant, candidate, evaluators, trials=trials, timeout=None)
    out, spent = [], 0
    for t in study.get_trials(deepcopy=False):
        spent += t.user_attrs.get("samples", 0)
        if t.state.is_finished():
            out.append({"state": t.state.name, "value": t.value if t.state.name == "COMPLETE" else None,
                        "samples": spent})
    return out


def reach(trace: list[dict], bar: float) -> tuple[int, int, bool]:
    """(trials, samples) until a completed trial reaches ``bar``; the budget if never."""
    for i, row in enumerate(trace, 1):
        if row["value"] is not None and row["value"] >= bar - 1e-12:
            return i, row["samples"], True
    return len(trace), trace[-1]["samples"] if trace else 0, False


def best_input_score(space, bench) -> float:
    from evomerge.search.held_out import one_model_recipe

    candidate, evaluators = bench
    scores = []
    for m in space.all_models():
        candidate.apply(one_model_recipe(m.model, space.dtype))
        scores.append(evaluators.search.evaluate(candidate.model, candidate.tokenizer).score)
    return max(scores)


def summarize(values: list[tuple[int, int, bool]], index: int) -> str:
    nums = [v[index] for v in values]
    never = any(not v[2] for v in values)
    med = statistics.median(nums)
    return f"{'>' if never else ''}{med:g} [{min(nums)}-{max(nums)}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default=str(REPO / "search_spaces" / "zoo_demo.yaml"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, default=30, help="budget per run (finished trials)")
    p.add_argument("--reference-trials", type=int, default=100, help="length of the reference run")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--limit", type=int, help="docs per task for a full evaluation (default: the space's)")
    p.add_argument("--cheap-limit", type=int, help="docs per task for the cheap-first check")
    p.add_argument("--zoo", help="an already built zoo directory (default: build/reuse the demo zoo)")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    p.add_argument("--reuse", help="a search_efficiency.json from an earlier run (same space and "
                   "settings): its reference run and the runs of samplers not run now are kept")
    args = p.parse_args(argv)

    import optuna

    from evomerge.search.loop import Evaluators
    from evomerge.search.run import resident_candidate
    from evomerge.search.samplers import default_sampler
    from evomerge.space import load_space
    from evomerge.zoo import build_zoo, default_zoo_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = Path(args.zoo) if args.zoo else default_zoo_dir("demo")
    if not args.zoo:
        build_zoo(zoo, variant="demo", log=lambda m: print(m, file=sys.stderr))
    space = load_space(args.space, variables={"ZOO": str(zoo)})
    update: dict = {"report_eval": None}
    if args.limit:
        update["eval"] = space.eval.model_copy(update={"limit": args.limit})
    if args.cheap_limit and space.pruning is not None:
        update["pruning"] = space.pruning.model_copy(update={"limit": args.cheap_limit})
    space = space.model_copy(update=update)
    start = time.monotonic()
    runs: dict[str, list[list[dict]]] = {}
    earlier = json.loads(Path(args.reuse).read_text()) if args.reuse else None
    with tempfile.TemporaryDirectory() as tmp, resident_candidate(space) as candidate, \
            Evaluators.for_space(space) as evaluators:
        bench = (candidate, evaluators)
        baseline = best_input_score(space, bench)
        print(f"best input model scores {baseline:.4f}", file=sys.stderr)
        if earlier:
            reference = earlier["reference"]
            runs = {k: v for k, v in earlier["runs"].items() if k not in args.samplers.split(",")}
        else:
            reference = run_one(space, bench, "cmaes", 10_000, args.reference_trials, Path(tmp))
        for sampler in args.samplers.split(","):
            for seed in range(args.seeds):
                t0 = time.monotonic()
                runs.setdefault(sampler, []).append(run_one(space, bench, sampler, seed, args.trials, Path(tmp)))
                best = max((r["value"] for r in runs[sampler][-1] if r["value"] is not None), default=float("nan"))
                print(f"{sampler} seed {seed}: best {best:.4f} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    all_values = [r["value"] for trace in [reference, *(t for ts in runs.values() for t in ts)]
                  for r in trace if r["value"] is not None]
    best = max(all_values)
    bars = {"95% of best": 0.95 * best, "95% of the gain over the best input": baseline + 0.95 * (best - baseline)}

    lines = [
        "# Search efficiency on the demo zoo",
        "",
        f"Space `{Path(args.space).name}` without start points, {space.eval.limit} docs per task; "
        f"{args.seeds} seeds × {args.trials} trials "
        f"per sampler; reference best B = {best:.4f} (CMA-ES run of {args.reference_trials} trials and all "
        f"runs); best input model {baseline:.4f}. Cells: median [min-max] over seeds; '>' = some seed "
        f"never reached the bar within the budget (counted as the budget). Samples = evaluated docs "
        f"(cheap-first + full). `default` = what `evomerge search` uses on this space: "
        f"{default_sampler(space)} with cheap-first pruning "
        f"({space.pruning.limit if space.pruning else '-'} docs/task first); `cmaes+pruning` = "
        "CMA-ES with the same pruning.",
        "",
        "| sampler | trials to 95% B | samples to 95% B | trials to 95% gain | samples to 95% gain | best in budget |",
        "|---|---|---|---|---|---|",
    ]
    table = {}
    for sampler in sorted(runs, key=lambda s: SAMPLERS.index(s) if s in SAMPLERS else len(SAMPLERS)):
        traces = runs[sampler]
        a = [reach(t, bars["95% of best"]) for t in traces]
        g = [reach(t, bars["95% of the gain over the best input"]) for t in traces]
        bests = [max((r["value"] for r in t if r["value"] is not None), default=float("nan")) for t in traces]
        table[sampler] = {"95_best": a, "95_gain": g, "best": bests}
        lines.append(f"| {sampler} | {summarize(a, 0)} | {summarize(a, 1)} | {summarize(g, 0)} | "
                     f"{summarize(g, 1)} | {statistics.median(bests):.4f} [{min(bests):.4f}-{max(bests):.4f}] |")
    lines += ["", f"Wall time {time.monotonic() - start:.0f}s on this machine."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_efficiency.md").write_text("\n".join(lines) + "\n")
    (out / "search_efficiency.json").write_text(json.dumps(
        {"reference_best": best, "best_input": baseline, "bars": bars, "reference": reference,
         "runs": runs, "table": table}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
