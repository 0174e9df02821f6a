"""Do merges of the zoo beat every single zoo model? A plain-torch check, independent of merge_engine.

    python benchmarks/zoo_merge_check.py [ZOO_DIR] [--variant demo] [--em]

Builds (or reuses) the zoo, scores base and experts on both held-out splits (multiple-choice
accuracy; exact match too with --em), then scores simple merges of state dicts:

* task arithmetic ``base + lam * sum_i (expert_i - base)`` over a grid of ``lam``;
* the plain average of the experts;
* with --grid, task arithmetic with one ``lam`` per expert over {0.5, 0.8, 1.0}^n.

``lam`` is picked on the search split; the report split is what counts. Prints one row per model
and the margin of the picked merge over the best single model (mean over skills, report split).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evomerge.zoo import build_zoo, default_zoo_dir  # noqa: E402
from evomerge.zoo.scoring import exact_match, mc_accuracy  # noqa: E402
from evomerge.zoo.tasks import SPLITS, split_examples  # noqa: E402

LAMBDAS = (0.3, 0.5, 0.7, 0.9, 1.0)


def task_arithmetic(base: dict, experts: list[dict], lam: float) -> dict:
    """base + lam * sum_i (expert_i - base), tensor by tensor."""
    return {k: base[k] + lam * sum(e[k] - base[k] for e in experts) for k in base}


def average(experts: list[dict]) -> dict:
    return {k: sum(e[k] for e in experts) / len(experts) for k in experts[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("zoo_dir", nargs="?", type=Path)
    ap.add_argument("--variant", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--em", action="store_true", help="also score greedy exact match")
    ap.add_argument("--grid", action="store_true", help="also try one lambda per expert")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    zoo = build_zoo(args.zoo_dir or default_zoo_dir(args.variant), args.variant, args.seed)
    tok = AutoTokenizer.from_pretrained(zoo.base_path)
    model = AutoModelForCausalLM.from_pretrained(zoo.base_path).eval()
    evals = {split: {s: split_examples(s, split) for s in zoo.skills} for split in SPLITS}
    states = {name: AutoModelForCausalLM.from_pretrained(path).state_dict()
              for name, path in zoo.models.items()}
    base, experts = states[zoo.base], [states[n] for n in zoo.experts.values()]

    def score(state: dict) -> dict[str, dict[str, float]]:
        model.load_state_dict(state)
        out = {}
        for split in SPLITS:
            out[split] = {s: mc_accuracy(model, tok, ex) for s, ex in evals[split].items()}
            if args.em:
                out[split + "_em"] = {s: exact_match(model, tok, ex) for s, ex in evals[split].items()}
        return out

    def mean(d: dict[str, float]) -> float:
        return sum(d.values()) / len(d)

    t0 = time.perf_counter()
    rows = {name: score(state) for name, state in states.items()}
    singles = list(rows)
    rows["average"] = score(average(experts))
    for lam in LAMBDAS:
        rows[f"task_arith_{lam}"] = score(task_arithmetic(base, experts, lam))
    if args.grid:
        for lams in itertools.product((0.5, 0.8, 1.0), repeat=len(experts)):
            scaled = [{k: base[k] + lam * (e[k] - base[k]) for k in base} for lam, e in zip(lams, experts)]
            rows["ta_" + "_".join(map(str, lams))] = score(task_arithmetic(base, scaled, 1.0))
    cols = [f"{s}" for s in zoo.skills]
    print(f"\nreport split, multiple-choice acc ({len(evals['report'][zoo.skills[0]])} per skill); "
          f"search-split mean in the last column")
    print(f"{'model':>18} " + " ".join(f"{c:>7}" for c in cols) + f" {'mean':>7} {'search':>7}"
          + (f" {'em':>7}" if args.em else ""))
    for name, r in rows.items():
        em = f" {mean(r['report_em']):7.3f}" if args.em else ""
        print(f"{name:>18} " + " ".join(f"{r['report'][s]:7.3f}" for s in zoo.skills)
              + f" {mean(r['report']):7.3f} {mean(r['search']):7.3f}{em}")
    merges = [n for n in rows if n not in singles]
    picked = max(merges, key=lambda n: mean(rows[n]["search"]))
    best_single = max(singles, key=lambda n: mean(rows[n]["report"]))
    margin = mean(rows[picked]["report"]) - mean(rows[best_single]["report"])
    print(f"\npicked on search: {picked} -> report mean {mean(rows[picked]['report']):.3f}; "
          f"best single model {best_single} {mean(rows[best_single]['report']):.3f}; "
          f"margin {margin:+.3f}  ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
