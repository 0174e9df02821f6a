#!/usr/bin/env python
"""Per-candidate time of an MoE search's apply step: in place vs a new model per candidate.

On the demo zoo (``search_spaces/zoo_moe.yaml``), alternating two candidates of the same shape
(3 experts; prompts, gate mode, top-k and shared-merge weights differ), ``--repeats`` times each:

- ``in place``: :meth:`MoECandidate.apply` as the search runs it (the build copied into the resident
  model by ``write_moe_into``);
- ``new model``: the same, with the resident model dropped first (what a changed expert count costs).

Both with and without the shared-weights merge. The steps are taken round-robin in one process, so
machine load hits all alike; medians and the ratio to ``new model`` are written to
``results/moe/apply_speed.md``.

Run:  .venv/bin/python benchmarks/moe_apply_speed.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "moe" / "apply_speed.md")
    args = ap.parse_args()

    import optuna

    from evomerge.moe.candidate import MoECandidate
    from evomerge.moe.search_space import MoERecipe, default_params, load_moe_space, trial_moe_recipe

    zoo = Path.home() / ".cache" / "evomerge" / "zoo" / "demo"
    space = load_moe_space(REPO / "search_spaces" / "zoo_moe.yaml", {"ZOO": str(zoo)})
    base = default_params(space)
    one = {**base, "add.weight": 0.3, "sort.weight": 0.5, "shift.weight": 0.6}
    two = {**one, "gate_mode": "cheap_embed", "experts_per_token": 1, "prompt.add.1": False, "sort.weight": 0.2}
    shared = [trial_moe_recipe(space, optuna.trial.FixedTrial(p)) for p in (one, two)]
    plain = [MoERecipe(r.config, None, r.seed) for r in shared]
    rows: dict[str, list] = {}
    with MoECandidate.load(space, device="cpu") as cand:
        for r in shared + plain:  # warm-up: caches, first loads
            cand.apply(r)
        for _ in range(args.repeats):
            for label, recipes in (("shared merge", shared), ("base shared weights", plain)):
                for how in ("in place", "new model"):
                    for r in recipes:  # each apply follows the other recipe: every step redone
                        if how == "new model":
                            cand.model = None
                        rows.setdefault((label, how), []).append(cand.apply(r))
    lines = ["# MoE search: per-candidate apply time (demo zoo, CPU)", "",
             f"`benchmarks/moe_apply_speed.py --repeats {args.repeats}`: two candidates of the same shape "
             "(3 experts of the 2-layer zoo), alternated; medians over "
             f"{2 * args.repeats} applies each, round-robin in one process on a shared 2-core machine. "
             "Evaluation of one candidate on the zoo's search split takes tens of seconds on the same machine.",
             "", "| shared weights | apply | merge s | build s | into model s | total s | × new model |",
             "|---|---|---|---|---|---|---|"]
    for label in ("shared merge", "base shared weights"):
        ref = statistics.median(s.seconds for s in rows[(label, "new model")])
        for how in ("in place", "new model"):
            got = rows[(label, how)]
            assert all(s.in_place == (how == "in place") for s in got), how
            med = [statistics.median(getattr(s, k) for s in got) for k in ("merge_s", "build_s", "load_s")]
            total = statistics.median(s.seconds for s in got)
            lines.append(f"| {label} | {how} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} | {total:.3f} "
                         f"| {total / ref:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
