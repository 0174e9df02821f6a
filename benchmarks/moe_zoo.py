#!/usr/bin/env python
"""The zoo MoE experiment: MoEs of the demo zoo's experts beside the best dense merge and every input.

1. Runs the MoE search ``search_spaces/zoo_moe.yaml`` (``--trials``, default 30; TPE; the first
   trial is mergekit-moe's default build with searched shared weights) into a scratch folder and
   copies its result files (report.txt, trials.csv, best/, summary.json, space.yaml) to
   ``OUT/search/``.
2. Scores on the held-out report split (every doc), one model at a time, in this one process:
   - ``moe default``: mergekit-moe's defaults (every expert, every prompt of the space's pools,
     ``gate_mode: hidden``, 2 experts per token, the base's own shared weights);
   - ``moe searched``: the search's best trial (rank 1 in best/);
   - ``dense merge``: the demo's committed best merge (``results/demo/best/01_*.yaml``), re-scored;
   - every input model (base, add, sort, shift).
3. Beside accuracy: parameters (stored, and active per token: an MoE runs the shared weights and
   ``experts_per_token`` experts' MLPs per token) and time per token (one forward pass over a fixed
   batch of 96 report prompts, CPU, median of ``--repeats`` passes taken round-robin over the
   models so machine load hits all of them alike).
4. Writes ``OUT/table.md`` (and ``OUT/moe_zoo.png``: accuracy against time per token).

Run:  .venv/bin/python benchmarks/moe_zoo.py [--trials 30] [--out results/moe] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPACE = REPO / "search_spaces" / "zoo_moe.yaml"
DEMO_BEST = REPO / "results" / "demo" / "best"
DATA = REPO / "eval_tasks" / "zoo" / "data"
RESULT_FILES = ("report.txt", "trials.csv", "best", "summary.json", "space.yaml")


def timing_batch(tokenizer, per_task: int = 32) -> dict[str, torch.Tensor]:
    """A fixed batch: the first ``per_task`` report prompts of each skill, each with its answer."""
    texts = []
    for skill in ("add", "sort", "shift"):
        with open(DATA / f"{skill}_report.jsonl") as fh:
            rows = [json.loads(line) for line in fh][:per_task]
        texts += [r["prompt"] + r["answer"] for r in rows]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def forward_seconds(model, batch) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(**batch)
        return time.perf_counter() - start


def params_of(model) -> tuple[int, int]:
    """(stored parameters, parameters active per token)."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not experts:
        return total, total
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - expert_params + expert_params * cfg.num_experts_per_tok // experts


def run_search(trials: int, out: Path, zoo: Path) -> Path:
    from evomerge.moe.run import run_moe_search
    from evomerge.moe.search_space import load_moe_space
    from evomerge.search.run import RunOptions

    space = load_moe_space(SPACE, {"ZOO": str(zoo)})
    scratch = Path(tempfile.mkdtemp(prefix="moe_zoo_"))
    start = time.perf_counter()
    summary = run_moe_search(space, RunOptions(out_dir=scratch / "run", trials=trials, device="cpu",
                                               placeholders={"ZOO": str(zoo)}),
                             log=lambda line: print(f"  {line}", flush=True),
                             progress=lambda p: print(f"  trial {p.trial} {p.state} ({p.seconds:.1f}s) "
                                                      f"best {p.best}", flush=True))
    print(f"search: {summary.finished} trials in {time.perf_counter() - start:.0f}s", flush=True)
    (out / "search").mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        src, dst = scratch / "run" / name, out / "search" / name
        if dst.is_dir():
            shutil.rmtree(dst)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return scratch / "run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "moe")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-search", action="store_true", help="reuse OUT/search/best (from an earlier run)")
    args = ap.parse_args()
    torch.manual_seed(0)

    from evomerge.candidate import Candidate, load_causal_lm
    from evomerge.moe.candidate import MoECandidate
    from evomerge.moe.search_space import MoERecipe, default_params, load_moe_space, trial_moe_recipe
    from evomerge.search.loop import Evaluators
    from merge_engine.recipe import load_recipe

    import optuna

    zoo = Path.home() / ".cache" / "evomerge" / "zoo" / "demo"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_search:
        run_search(args.trials, args.out, zoo)
    space = load_moe_space(SPACE, {"ZOO": str(zoo)})
    best_moe = sorted((args.out / "search" / "best").glob("01_*.moe.yml"))[0]
    shared = best_moe.with_name(best_moe.name.replace(".moe.yml", ".shared.yml"))
    trial = json.loads(best_moe.with_suffix("").with_suffix(".json").read_text())
    # the best trial's genes -> its candidate, exactly as the search built it
    searched = trial_moe_recipe(space, optuna.trial.FixedTrial(trial["params"]))
    defaults = MoERecipe(trial_moe_recipe(space, optuna.trial.FixedTrial(
        {**trial["params"], **default_params(space)})).config, None, space.seed)
    dense_path = sorted(DEMO_BEST.glob("01_*.yaml"))[0]
    dense = load_recipe(dense_path, {"ZOO": str(zoo)})

    evals = Evaluators.for_space(space, "cpu")
    rows: dict[str, dict] = {}
    models: dict[str, object] = {}
    with MoECandidate.load(space, device="cpu") as cand:
        batch = timing_batch(cand.tokenizer)
        for label, recipe in (("MoE, mergekit-moe defaults", defaults), ("MoE, searched", searched)):
            cand.apply(recipe)
            result = evals.report.evaluate(cand.model, cand.tokenizer)
            rows[label] = {"scores": {t.task: t.value for t in result.tasks}, "mean": result.score,
                           "params": params_of(cand.model),
                           "what": f"{len(recipe.config.experts)} experts, top-{recipe.config.experts_per_token}, "
                                   f"{recipe.config.gate_mode}, shared: "
                                   + ("base" if recipe.shared is None else recipe.shared.merge_method)}
            models[label] = cand.model
            cand.model = None  # keep this one for timing; the next apply loads its own
            print(f"{label}: {result.score:.4f}", flush=True)
        with Candidate.load(zoo / "base", dtype=space.dtype, device="cpu") as merged:
            merged.apply(dense)
            score(rows, models, evals, "dense merge (demo best)", merged.model, merged.tokenizer,
                  f"{dense.merge_method}, {dense_path.name}")
        for m in space.all_models():
            model, tokenizer = load_causal_lm(m.model, dtype=space.dtype)
            score(rows, models, evals, f"input {m.name}", model, tokenizer, "dense")
    evals.close()
    times: dict[str, list[float]] = {k: [] for k in models}
    tokens = int(batch["attention_mask"].sum())
    for label, model in models.items():
        forward_seconds(model, batch)  # warm-up
    for _ in range(args.repeats):
        for label, model in models.items():
            times[label].append(forward_seconds(model, batch))
    for label in rows:
        rows[label]["us_per_token"] = statistics.median(times[label]) / tokens * 1e6
    write_table(args.out, rows, tokens, args)


def score(rows: dict, models: dict, evals, label: str, model, tokenizer, what: str) -> None:
    result = evals.report.evaluate(model, tokenizer)
    rows[label] = {"scores": {t.task: t.value for t in result.tasks}, "mean": result.score,
                   "params": params_of(model), "what": what}
    models[label] = model
    print(f"{label}: {result.score:.4f}", flush=True)


def write_table(out: Path, rows: dict[str, dict], tokens: int, args) -> None:
    tasks = list(next(iter(rows.values()))["scores"])
    base_time = rows["input base"]["us_per_token"]
    lines = ["# Zoo MoE experiment (issue 16)", "",
             f"Regenerate: `.venv/bin/python benchmarks/moe_zoo.py --trials {args.trials}` (the search's result "
             "files are in `search/`). Held-out report split, every doc (300 per task), multiple-choice accuracy. "
             f"Time per token: one CPU forward pass over {tokens} tokens (96 report prompts with answers), "
             f"median of {args.repeats} passes taken round-robin; relative to the base model measured in the same run.",
             "", "| model | " + " | ".join(tasks) + " | report mean | params (stored) | params active/token "
             "| µs/token | × base time | what |",
             "|---|" + "---|" * (len(tasks) + 6)]
    for label, r in rows.items():
        total, active = r["params"]
        lines.append(f"| {label} | " + " | ".join(f"{r['scores'][t]:.3f}" for t in tasks)
                     + f" | **{r['mean']:.3f}** | {total / 1e3:.0f}k | {active / 1e3:.0f}k | "
                       f"{r['us_per_token']:.2f} | {r['us_per_token'] / base_time:.2f} | {r['what']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, r in rows.items():
            ax.scatter(r["us_per_token"], r["mean"], s=40)
            ax.annotate(label, (r["us_per_token"], r["mean"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("µs per token (CPU forward pass)")
        ax.set_ylabel("held-out report mean accuracy")
        ax.set_title("Demo zoo: MoEs vs dense merge vs inputs")
        fig.tight_layout()
        fig.savefig(out / "moe_zoo.png", dpi=110)
    except Exception as err:  # noqa: BLE001  the table is the result; the plot is a convenience
        print(f"no plot: {err}")


if __name__ == "__main__":
    main()
