"""How many trials and evaluated samples does each sampler need to find a good merge?

    python benchmarks/search_efficiency.py                      # demo zoo, 5 seeds, ~30-60 min
    python benchmarks/search_efficiency.py --seeds 2 --trials 12 --reference-trials 30   # quick look
    python benchmarks/search_efficiency.py --limit 40 --cheap-limit 10     # cheaper evaluations
    python benchmarks/search_efficiency.py --space search_spaces/zoo_big.yaml \
        --samplers default,cmaes,random --samples 9000 --reference-trials 40 --start   # 36 parameters

For each sampler (CMA-ES, TPE, GP, random, and our default: the space's default sampler with
its rungs, GP with cheap-first pruning on the 6-parameter space, coarse-to-fine with
successive-halving rungs on zoo_big; and CMA-ES with the space's rungs) and
each seed, a search runs on the demo zoo's space without start points (so samplers are compared
on what they propose themselves). A long CMA-ES run (plus every run's best) sets the reference
best score B. Every candidate shares one resident model and one set of built lm-eval tasks, so
the loop measured here is the real one (merge in place -> evaluate). Writes
results/benchmarks/search_efficiency.md (+ .json); another space writes
search_efficiency_<space>.md (zoo_big.yaml: search_efficiency_big.md).

How progress is read (the same rule for every sampler, fixed before the big-space runs):

* a run's progress after ``s`` evaluated docs is its **incumbent**: the full-set score of the best
  *complete* trial among those finished by then (what ``evomerge search`` reports and writes as
  its best, ``results.store.top_trials``). A pruned trial's cheap-rung score never counts: a
  multi-fidelity run has found a good merge only once one was scored in full;
* samples = evaluated docs, every rung included (a survivor's later rungs score only new docs);
* the bars, each reported as trials and samples until the incumbent reaches it, median
  [min-max] over seeds, a run that never reaches it counted as its budget and marked ">":
  **95 % of B** (the older definition, kept for comparison; on the zoo it sits barely above the
  best input model, so lucky first draws reach it), **80 % and 95 % of the gain over the best
  input** (best input + 0.8·(B - best input), and 0.95·: the stricter bars; the target of issue
  15 is read at 95 % of the gain);
* best in budget: the incumbent at the end of the budget.

The big-space mode (``--samples``, ``--start``): every run gets the same budget of evaluated docs
rather than of trials (rungs make a trial cheaper, so a trial budget would favour the full-eval
samplers), and the default keeps what ``evomerge search`` does on that space: its sampler, its
``fidelity:`` rungs and its start points; CMA-ES alone (mergekit-evolve's algorithm) and random
score every candidate in full, from no start point. Runs are seeded and deterministic, so the
samplers can run in separate processes (``--reference-trials 0`` skips the reference run) and
their json files be put together with ``--reuse a.json,b.json,...`` (the table only, with
``--samplers ''``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = ("default", "cmaes+pruning", "cmaes", "tpe", "gp", "random")


def run_one(space, bench, sampler: str, seed: int, trials: int, storage_dir: Path, *,
            samples: int | None = None, start: bool = False,
            on_trial: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One search; returns per finished trial: state, value (COMPLETE only), samples spent so far.

    Only ``default`` and ``cmaes+pruning`` keep the space's cheap rungs (``pruning:`` or
    ``fidelity:``); with ``start`` the default also scores the space's start points first (as
    ``evomerge search`` does). ``samples``: run until that many docs are scored instead of
    ``trials`` finished trials (the same evaluation budget for every sampler). ``on_trial`` gets
    the trace so far after each trial (a run cut short keeps it: with a budget of samples the
    trace up to any smaller budget is exactly that smaller run's, the runs being seeded)."""
    from dataclasses import replace

    from evomerge.search.fidelity import RungLadder
    from evomerge.search.loop import count_finished, search_loop
    from evomerge.search.samplers import default_sampler
    from evomerge.search.study import enqueue_start_points, open_study

    cheap = sampler in ("default", "cmaes+pruning")
    variant = space.model_copy(update={
        "seed": seed, "pruning": space.pruning if cheap else None,
        "fidelity": space.fidelity if cheap else None,
        "start": space.start if start and sampler == "default" else ()})
    candidate, evaluators = bench
    # a fresh ladder per run: its anchor rung is fitted on the run's own first trials
    evaluators = replace(evaluators, ladder=RungLadder.for_space(variant, evaluators.search))
    study = open_study(variant, storage=f"sqlite:///{storage_dir / f'{sampler}-{seed}.db'}",
                       study_name=f"{sampler}-{seed}",
                       sampler={"default": default_sampler(space),
                                "cmaes+pruning": "cmaes"}.get(sampler, sampler))
    enqueue_start_points(study, variant)
    if samples is None:
        search_loop(study, variant, candidate, evaluators, trials=trials, timeout=None)
    else:
        while sum(t.user_attrs.get("samples", 0) for t in study.get_trials(deepcopy=False)) < samples:
            search_loop(study, variant, candidate, evaluators, trials=count_finished(study) + 1, timeout=None)
            if on_trial is not None:
                on_trial(trace_of(study, samples))
    return trace_of(study, samples)


def trace_of(study, samples: int | None) -> list[dict]:
    """Per finished trial (in trial order): state, value (COMPLETE only), samples spent so far;
    with a budget of ``samples``, only the trials within it."""
    out, spent = [], 0
    for t in study.get_trials(deepcopy=False):
        spent += t.user_attrs.get("samples", 0)
        if t.state.is_finished():
            out.append({"state": t.state.name, "value": t.value if t.state.name == "COMPLETE" else None,
                        "samples": spent})
    # the trial that crossed the sample budget is over it
    return [r for r in out if samples is None or r["samples"] <= samples]


def reach(trace: list[dict], bar: float) -> tuple[int, int, bool]:
    """(trials, samples) until a completed trial reaches ``bar``; the budget if never."""
    for i, row in enumerate(trace, 1):
        if row["value"] is not None and row["value"] >= bar - 1e-12:
            return i, row["samples"], True
    return len(trace), trace[-1]["samples"] if trace else 0, False


def merged_runs(paths: list[str]) -> dict:
    """The reference run and the runs of several json files of this script (one process per
    sampler, or one part of its seeds): the longest reference, and each sampler's runs in file order."""
    merged: dict = {"reference": [], "runs": {}}
    for path in paths:
        got = json.loads(Path(path).read_text())
        if len(got["reference"]) > len(merged["reference"]):
            merged["reference"] = got["reference"]
        for sampler, traces in got["runs"].items():  # one sampler's seeds may be split over files
            merged["runs"].setdefault(sampler, []).extend(traces)
    return merged


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


def describe(args: argparse.Namespace, space, best: float, baseline: float) -> str:
    """The paragraph under the table's title: the space, the budget, what each row is."""
    from evomerge.search.samplers import default_sampler
    from evomerge.space.genome import distributions

    budget = (f"a budget of {args.samples} evaluated docs per run" if args.samples
              else f"{args.trials} trials per sampler")
    if space.fidelity is not None:
        fid = space.fidelity
        anchors = f"an anchor-estimate rung of {fid.anchors} docs/task, then " if fid.anchors else ""
        cheap = (f"successive-halving rungs ({anchors}{', '.join(map(str, fid.rungs))} docs/task, the top "
                 f"1/{fid.reduction_factor:g} going on, after {fid.startup_trials} startup trials)")
    else:
        cheap = f"cheap-first pruning ({space.pruning.limit if space.pruning else '-'} docs/task first)"
    start = (f"{', '.join('equal' if sp.equal else 'a start point' for sp in space.start)} start point scored first"
             if args.start and space.start else "no start points")
    return (f"Space `{Path(args.space).name}` ({len(distributions(space))} searched parameters), "
            f"{'the default with ' + start + ', the others ' if args.start else ''}without start points, "
            f"{space.eval.limit} docs per task; {args.seeds} seeds × {budget}; reference best "
            f"B = {best:.4f} (best of a CMA-ES run and all runs); best input model "
            f"{baseline:.4f}. Cells: median [min-max] over seeds; '>' = some seed never reached the bar "
            f"within the budget (counted as the budget). Samples = evaluated docs (cheap rungs + full). "
            f"`default` = what `evomerge search` uses on this space: {default_sampler(space)} with {cheap}; "
            f"`cmaes+pruning` = CMA-ES with the same rungs; the other rows score every candidate in full.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default=str(REPO / "search_spaces" / "zoo_demo.yaml"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed+seeds-1 "
                   "(to split one sampler's seeds over processes)")
    p.add_argument("--trials", type=int, default=30, help="budget per run (finished trials)")
    p.add_argument("--reference-trials", type=int, default=100, help="length of the reference run")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--limit", type=int, help="docs per task for a full evaluation (default: the space's)")
    p.add_argument("--cheap-limit", type=int, help="docs per task for the cheap-first check")
    p.add_argument("--zoo", help="an already built zoo directory (default: build/reuse the demo zoo)")
    p.add_argument("--samples", type=int, help="budget per run in evaluated docs instead of --trials "
                   "(every sampler gets the same evaluation budget; the reference run still uses "
                   "--reference-trials)")
    p.add_argument("--start", action="store_true",
                   help="the default also scores the space's start points first, as `evomerge search` does")
    p.add_argument("--cut", type=int, help="with --reuse: read every run up to this many evaluated docs "
                   "(a smaller budget, the same for all; each run must have got that far)")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    p.add_argument("--name", help="file name of the table (default: search_efficiency for zoo_demo.yaml, "
                   "search_efficiency_<space> otherwise)")
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
    earlier = merged_runs(args.reuse.split(",")) if args.reuse else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.space).stem
    name = args.name or ("search_efficiency" if stem == "zoo_demo" else f"search_efficiency_{stem.removeprefix('zoo_')}")
    partial = out / f"{name}.partial.json"
    with tempfile.TemporaryDirectory() as tmp, resident_candidate(space) as candidate, \
            Evaluators.for_space(space) as evaluators:
        bench = (candidate, evaluators)
        baseline = best_input_score(space, bench)
        print(f"best input model scores {baseline:.4f}", file=sys.stderr)
        if earlier:
            reference = earlier["reference"]
            runs = {k: v for k, v in earlier["runs"].items() if k not in args.samplers.split(",")}
        else:
            reference = (run_one(space, bench, "cmaes", 10_000, args.reference_trials, Path(tmp))
                         if args.reference_trials else [])
            partial.write_text(json.dumps({"reference": reference, "best_input": baseline, "runs": runs}))
        for sampler in filter(None, args.samplers.split(",")):  # none: only the table of --reuse
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                t0 = time.monotonic()
                def keep(trace: list[dict], sampler: str = sampler) -> None:
                    partial.write_text(json.dumps({"reference": reference, "best_input": baseline,
                                                   "runs": {**runs, sampler: [*runs.get(sampler, []), trace]}}))

                runs.setdefault(sampler, []).append(run_one(space, bench, sampler, seed, args.trials, Path(tmp),
                                                            samples=args.samples, start=args.start, on_trial=keep))
                best = max((r["value"] for r in runs[sampler][-1] if r["value"] is not None), default=float("nan"))
                print(f"{sampler} seed {seed}: best {best:.4f} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
                # each finished run is kept at once: a long run cut short still has its traces
                partial.write_text(json.dumps({"reference": reference, "best_input": baseline, "runs": runs}))
    if args.cut:
        runs = {k: [[r for r in t if r["samples"] <= args.cut] for t in ts] for k, ts in runs.items()}
        args.samples = args.cut
    all_values = [r["value"] for trace in [reference, *(t for ts in runs.values() for t in ts)]
                  for r in trace if r["value"] is not None]
    best = max(all_values)
    bars = {"95% of best": 0.95 * best, "80% of the gain over the best input": baseline + 0.80 * (best - baseline),
            "95% of the gain over the best input": baseline + 0.95 * (best - baseline)}

    lines = [
        "# Search efficiency on the demo zoo",
        "",
        describe(args, space, best, baseline),
        "",
        "| sampler | trials to 95% B | samples to 95% B | trials to 80% gain | samples to 80% gain "
        "| trials to 95% gain | samples to 95% gain | best in budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = {}
    for sampler in sorted(runs, key=lambda s: SAMPLERS.index(s) if s in SAMPLERS else len(SAMPLERS)):
        traces = runs[sampler]
        a = [reach(t, bars["95% of best"]) for t in traces]
        g80 = [reach(t, bars["80% of the gain over the best input"]) for t in traces]
        g = [reach(t, bars["95% of the gain over the best input"]) for t in traces]
        bests = [max((r["value"] for r in t if r["value"] is not None), default=float("nan")) for t in traces]
        table[sampler] = {"95_best": a, "80_gain": g80, "95_gain": g, "best": bests}
        lines.append(f"| {sampler} | {summarize(a, 0)} | {summarize(a, 1)} | {summarize(g80, 0)} | "
                     f"{summarize(g80, 1)} | {summarize(g, 0)} | "
                     f"{summarize(g, 1)} | {statistics.median(bests):.4f} [{min(bests):.4f}-{max(bests):.4f}] |")
    lines += ["", f"Wall time {time.monotonic() - start:.0f}s on this machine."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(
        {"reference_best": best, "best_input": baseline, "bars": bars, "reference": reference,
         "runs": runs, "table": table}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
