"""Parameter space only vs data flow only vs both, at the same evaluation budget, on a zoo.

    python benchmarks/dataflow_experiment.py                    # deep zoo (built if missing), 2 seeds
    python benchmarks/dataflow_experiment.py --seeds 1 --trials 8 --zoo ~/.cache/evomerge/zoo/demo \
        --variant demo --out /tmp/df                           # a quick look on the 2-layer zoo
    python benchmarks/dataflow_experiment.py --seeds 1 --first-seed 1 --part /tmp/s1.json   # one seed
    python benchmarks/dataflow_experiment.py --combine /tmp/s0.json /tmp/s1.json           # one table

Three arms, each given ``--trials`` finished trials of ``3 x limit`` evaluated docs (no pruning,
so trials x docs per trial is the budget; a rejected path costs no docs and does not count):

* (a) parameters: ``search_spaces/zoo_deep_dataflow_params.yaml`` (task arithmetic, one weight
  per expert and layer);
* (b) data flow: ``search_spaces/zoo_deep_dataflow_path.yaml`` (the layer path through base and
  experts, at most 24 layers), starting from each input model's own path (identity);
* (c) both: stage 1 is (a) for half the trials; its best merge is written to a temp folder
  with ``merge_engine.merge.run_merge``; stage 2 searches (b)'s space with that merge in the
  base's place (so the path runs over the merge plus the experts) for the other half. Its
  recipe is committed as a multi-stage recipe (stage 1 named ``params_merge``), checked with
  ``merge_engine.stages.load_stages``. (The one-command pipeline is not used here.)

Every input model, the best *uniform* merge (task arithmetic with one weight for every expert
and layer, the best of a small grid on the search split) and each arm's best trial (by its
search-split score) are scored on the held-out report split (every doc). Writes
``dataflow.md`` (table), ``dataflow.json``, ``dataflow.png`` (best search score vs evaluated
docs) and ``recipes/<arm>.yaml`` (best seed of each arm) into ``--out``.
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
SPACES = {"params": REPO / "search_spaces" / "zoo_deep_dataflow_params.yaml",
          "path": REPO / "search_spaces" / "zoo_deep_dataflow_path.yaml"}
UNIFORM_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)
ARMS = {"a": "parameters only", "b": "data flow only", "c": "parameters, then data flow"}


def run_study(space, candidate, search_ev, seed: int, trials: int, storage: Path, name: str,
              identities: bool = False) -> list:
    """One search of ``trials`` finished trials from the space's start points (``identities``:
    a layer-path space also starts from every model's own path); returns its trials in order."""
    from evomerge.search.loop import Evaluators, search_loop
    from evomerge.search.samplers import default_sampler
    from evomerge.search.study import enqueue_start_points, open_study

    variant = space.model_copy(update={"seed": seed, "pruning": None})
    study = open_study(variant, storage=f"sqlite:///{storage / f'{name}.db'}", study_name=name,
                       sampler=default_sampler(variant))
    enqueue_start_points(study, variant)
    if identities:
        from evomerge.space.layer_path import identity_params

        for m in variant.all_models()[1:]:  # the first one's path is the space's 'equal' start
            study.enqueue_trial(identity_params(variant, m.name), user_attrs={"start_point": m.name})
    search_loop(study, variant, candidate, Evaluators(search_ev), trials=trials, timeout=None)
    return study.get_trials(deepcopy=False)


def trace_of(trials: list, offset: int = 0) -> list[dict]:
    """Per finished trial: docs spent so far (from ``offset``), its score, its layer count."""
    out, spent = [], offset
    for t in trials:
        spent += t.user_attrs.get("search_samples", 0)
        if t.state.name == "COMPLETE":
            out.append({"docs": spent, "score": t.value, "layers": t.user_attrs.get("layers")})
    return out


def best_trial(trials: list):
    done = [t for t in trials if t.state.name == "COMPLETE"]
    return max(done, key=lambda t: (t.value, -t.number))


def score(candidate, evaluator, recipe) -> dict:
    """``{"score": mean, "tasks": {task: value}}`` of ``recipe`` under ``evaluator``."""
    candidate.apply(recipe)
    res = evaluator.evaluate(candidate.model, candidate.tokenizer)
    return {"score": res.score, "tasks": {t.task: t.value for t in res.tasks}, "docs": res.n_samples}


def uniform_recipe(space, weight: float):
    from merge_engine.recipe import parse_recipe

    return parse_recipe({"merge_method": "task_arithmetic", "dtype": space.dtype,
                         "base_model": space.base_model.model, "parameters": {"lambda": 1.0},
                         "models": [{"model": m.model, "parameters": {"weight": weight}}
                                    for m in space.models]})


def with_merge_as_base(path_space, merge_dir: Path):
    """(b)'s space with the stage-1 merge in the base's place."""
    base = path_space.base_model.model_copy(update={"name": "merge", "model": str(merge_dir)})
    return path_space.model_copy(update={"base_model": base, "name": f"{path_space.name}_stage2"})


def multistage_yaml(stage1, stage2, merge_dir: Path, zoo: Path) -> str:
    """The (c) recipe as one multi-stage file: stage 1 named ``params_merge``, stage 2 final."""
    import yaml

    from merge_engine.stages import parse_stages

    first = {"name": "params_merge", **yaml.safe_load(stage1.to_yaml())}
    final = yaml.safe_load(stage2.to_yaml().replace(str(merge_dir), "params_merge"))
    parse_stages([first, final], source="arm c")  # the references resolve, no cycle
    text = yaml.safe_dump(first, sort_keys=False) + "---\n" + yaml.safe_dump(final, sort_keys=False)
    return text.replace(str(zoo), "${ZOO}")


def run_seed(spaces, candidate, evs, seed: int, trials: int, tmp: Path, zoo: Path, log) -> dict:
    from merge_engine.merge import run_merge

    from evomerge.results.store import trial_recipe_of

    out: dict = {}
    for arm, key in (("a", "params"), ("b", "path")):
        t0 = time.monotonic()
        got = run_study(spaces[key], candidate, evs["search"], seed, trials, tmp, f"{arm}{seed}",
                        identities=arm == "b")
        best = best_trial(got)
        out[arm] = {"trace": trace_of(got), "best": best.value, "recipe": best.user_attrs["recipe"],
                    "layers": best.user_attrs.get("layers", spaces[key].num_layers),
                    "failed": sum(t.state.name == "FAIL" for t in got),
                    "seconds": round(time.monotonic() - t0)}
        out[arm]["report"] = score(candidate, evs["report"], trial_recipe_of(best))
        log(f"seed {seed} arm {arm}: search {best.value:.4f} report {out[arm]['report']['score']:.4f} "
            f"({out[arm]['seconds']}s)")
    t0 = time.monotonic()
    first = trials // 2
    s1 = run_study(spaces["params"], candidate, evs["search"], seed, first, tmp, f"c1_{seed}")
    best1 = best_trial(s1)
    merge_dir = tmp / f"stage1_seed{seed}"
    run_merge(trial_recipe_of(best1), merge_dir, force=True)
    stage2_space = with_merge_as_base(spaces["path"], merge_dir)
    s2 = run_study(stage2_space, candidate, evs["search"], seed, trials - first, tmp, f"c2_{seed}")
    trace1 = trace_of(s1)
    best2 = best_trial(s2)
    out["c"] = {"trace": trace1 + trace_of(s2, trace1[-1]["docs"] if trace1 else 0),
                "best": max(best1.value, best2.value), "stage1": best1.value, "stage2": best2.value,
                "layers": best2.user_attrs.get("layers"),
                "failed": sum(t.state.name == "FAIL" for t in s1 + s2),
                "recipe": multistage_yaml(trial_recipe_of(best1), trial_recipe_of(best2), merge_dir, zoo)}
    # the final model of (c) is stage 2's best; its start point is the stage-1 merge itself
    out["c"]["report"] = score(candidate, evs["report"], trial_recipe_of(best2))
    out["c"]["report_stage1"] = score(candidate, evs["report"], trial_recipe_of(best1))
    out["c"]["seconds"] = round(time.monotonic() - t0)
    log(f"seed {seed} arm c: search {best1.value:.4f} -> {best2.value:.4f} report "
        f"{out['c']['report']['score']:.4f} ({out['c']['seconds']}s)")
    return out


def baselines(space, candidate, evs, log) -> dict:
    """Every input model and the best uniform merge, on both splits."""
    from evomerge.search.held_out import one_model_recipe

    out: dict = {"inputs": {}, "uniform": {}}
    for m in space.all_models():
        recipe = one_model_recipe(m.model, space.dtype)
        out["inputs"][m.name] = {"search": score(candidate, evs["search"], recipe),
                                 "report": score(candidate, evs["report"], recipe)}
        log(f"input {m.name}: report {out['inputs'][m.name]['report']['score']:.4f}")
    grid = {w: score(candidate, evs["search"], uniform_recipe(space, w)) for w in UNIFORM_GRID}
    w = max(grid, key=lambda k: grid[k]["score"])
    out["uniform"] = {"weight": w, "grid": {str(k): v["score"] for k, v in grid.items()},
                      "search": grid[w], "report": score(candidate, evs["report"], uniform_recipe(space, w))}
    log(f"uniform merge (weight {w}): report {out['uniform']['report']['score']:.4f}")
    return out


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" + (f" [{min(values):.3f}-{max(values):.3f}]" if len(values) > 1 else "")


def write_outputs(out: Path, data: dict, zoo_label: str) -> None:
    base, seeds = data["baselines"], data["seeds"]
    tasks = list(next(iter(base["inputs"].values()))["report"]["tasks"])
    short = [t.removeprefix("zoo_").removesuffix("_report") for t in tasks]
    lines = [f"# Parameter space vs data flow vs both ({zoo_label})", "",
             f"{len(seeds)} seed(s); every arm {data['trials']} finished trials x {data['docs_per_trial']} "
             f"docs = {data['trials'] * data['docs_per_trial']} evaluated search-split docs "
             f"(arm c: {data['trials'] // 2} + {data['trials'] - data['trials'] // 2}). Report = held-out "
             "report split (every doc, mc accuracy), for each arm the best trial by search score; "
             "median [min-max] over seeds. Written by `benchmarks/dataflow_experiment.py`.", "",
             f"| model | layers | {' | '.join(short)} | report mean | search mean |",
             "|---|---|" + "---|" * len(short) + "---|---|"]
    for name, row in base["inputs"].items():
        cells = " | ".join(f"{row['report']['tasks'][t]:.3f}" for t in tasks)
        lines.append(f"| input {name} | {data['native_layers']} | {cells} | {row['report']['score']:.3f} | "
                     f"{row['search']['score']:.3f} |")
    u = base["uniform"]
    cells = " | ".join(f"{u['report']['tasks'][t]:.3f}" for t in tasks)
    lines.append(f"| best uniform merge (weight {u['weight']}) | {data['native_layers']} | {cells} | "
                 f"{u['report']['score']:.3f} | {u['search']['score']:.3f} |")
    for arm, label in ARMS.items():
        runs = [s[arm] for s in seeds]
        cells = " | ".join(med([r["report"]["tasks"][t] for r in runs]) for t in tasks)
        layers = "/".join(str(r["layers"]) for r in runs)
        lines.append(f"| ({arm}) {label} | {layers} | {cells} | {med([r['report']['score'] for r in runs])} | "
                     f"{med([r['best'] for r in runs])} |")
    c = [s["c"] for s in seeds]
    lines += ["", f"Arm (c) stage by stage, search score: stage 1 {med([r['stage1'] for r in c])}, "
              f"stage 2 {med([r['stage2'] for r in c])}; report of the stage-1 merge alone "
              f"{med([r['report_stage1']['score'] for r in c])}. Failed (rejected) trials per seed: "
              + ", ".join(f"{arm} {[s[arm]['failed'] for s in seeds]}" for arm in ARMS) + ".",
              f"Run time {data['seconds']}s on this machine (2 cores shared with other jobs; summed "
              "over the runs when seeds ran as separate processes)."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataflow.md").write_text("\n".join(lines) + "\n")
    (out / "dataflow.json").write_text(json.dumps(data, indent=1).replace(data["zoo"], "${ZOO}") + "\n")
    recipes = out / "recipes"
    recipes.mkdir(exist_ok=True)
    for arm in ARMS:
        best = max(seeds, key=lambda s: s[arm]["report"]["score"])[arm]
        text = best["recipe"] if arm == "c" else best["recipe"].replace(data["zoo"], "${ZOO}")
        (recipes / f"{arm}.yaml").write_text(f"# arm ({arm}) {ARMS[arm]}: best seed's best trial, report "
                                             f"{best['report']['score']:.3f}\n" + text)
    plot(out / "dataflow.png", seeds, base)
    print("\n".join(lines))


def plot(path: Path, seeds: list[dict], base: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    for arm, label in ARMS.items():
        for i, s in enumerate(seeds):
            xs, ys, best = [], [], float("-inf")
            for row in s[arm]["trace"]:
                best = max(best, row["score"])
                xs.append(row["docs"])
                ys.append(best)
            ax.step(xs, ys, where="post", color=colors[arm], alpha=0.9 if i == 0 else 0.5,
                    label=f"({arm}) {label}" if i == 0 else None)
    top = max(v["search"]["score"] for v in base["inputs"].values())
    ax.axhline(top, color="gray", ls="--", lw=1, label="best input model")
    ax.axhline(base["uniform"]["search"]["score"], color="gray", ls=":", lw=1, label="best uniform merge")
    ax.set_xlabel("evaluated search-split docs")
    ax.set_ylabel("best search score so far")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="deep", help="zoo variant to build/reuse (default: deep)")
    p.add_argument("--zoo", help="an already built zoo directory (default: the variant's cache folder)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--part", help="write this run's data to this JSON file only (no table)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="write the table from --part files of the same settings (seeds concatenated)")
    p.add_argument("--trials", type=int, default=24, help="finished trials per arm (c: split in two)")
    p.add_argument("--limit", type=int, default=50, help="search-split docs per task per trial")
    p.add_argument("--max-layers", type=int, help="layer_path.max_layers (default: the space's)")
    p.add_argument("--out", default=str(REPO / "results" / "dataflow"))
    args = p.parse_args(argv)
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        data = {**parts[0], "seeds": [s for part in parts for s in part["seeds"]],
                "seconds": sum(part["seconds"] for part in parts)}
        write_outputs(Path(args.out), data, data["label"])
        return 0

    import optuna
    import torch

    from evomerge.evaluate import make_evaluator
    from evomerge.search.run import resident_candidate
    from evomerge.space import load_space
    from evomerge.zoo import build_zoo, default_zoo_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # tiny models; the machine is shared
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    zoo = Path(args.zoo).expanduser().resolve() if args.zoo else default_zoo_dir(args.variant)
    if not args.zoo:
        build_zoo(zoo, variant=args.variant, log=log)
    spaces = {k: load_space(v, variables={"ZOO": str(zoo)}) for k, v in SPACES.items()}
    spaces = {k: s.model_copy(update={"eval": s.eval.model_copy(update={"limit": args.limit})})
              for k, s in spaces.items()}
    if args.max_layers:
        lp = spaces["path"].layer_path.model_copy(update={"max_layers": args.max_layers})
        spaces["path"] = spaces["path"].model_copy(update={"layer_path": lp})
    space = spaces["params"]
    start = time.monotonic()
    evs = {"search": make_evaluator(space.eval), "report": make_evaluator(space.report_eval)}
    try:
        with tempfile.TemporaryDirectory(prefix="dataflow-") as tmp, resident_candidate(space) as candidate:
            base = baselines(space, candidate, evs, log)
            seeds = [run_seed(spaces, candidate, evs, seed, args.trials, Path(tmp), zoo, log)
                     for seed in range(args.first_seed, args.first_seed + args.seeds)]
    finally:
        for ev in evs.values():
            ev.close()
    data = {"zoo": str(zoo), "variant": args.variant, "trials": args.trials,
            "docs_per_trial": args.limit * len(space.eval.tasks), "native_layers": space.num_layers,
            "max_layers": spaces["path"].layer_path.max_layers, "baselines": base, "seeds": seeds,
            "seconds": round(time.monotonic() - start),
            "label": f"{args.variant} zoo, {space.num_layers} layers per model"}
    if args.part:
        Path(args.part).write_text(json.dumps(data, indent=1) + "\n")
        return 0
    write_outputs(Path(args.out), data, data["label"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
