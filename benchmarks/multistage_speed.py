#!/usr/bin/env python
"""A three-stage recipe on the 1.06B benchmark checkpoints: one ``evomerge merge`` (intermediates in
memory) against the same stages merged one by one through disk, and against intermediates spilled
to disk (``--stage-memory 0``). Each mode runs in its own process (peak RSS is that process's),
the modes alternate in one run, and every output's weights are hashed: they must be identical.

Run:  .venv/bin/python benchmarks/multistage_speed.py [--repeats 1] [--report results/benchmarks/multistage_speed.md]
Needs the checkpoints ``benchmarks/merge_speed.py`` builds (``~/.cache/evomerge/bench/llama1b-v1``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = Path.home() / ".cache" / "evomerge" / "bench"
MODELS = BENCH / "llama1b-v1"
WORK = BENCH / "work-multistage"


def stages(models: Path) -> list[dict]:
    """linear(ft1, ft2) -> task_arithmetic(blend, ft3 over base) -> linear(moved, ft1): the
    deterministic shape of a typical multi-stage model-card recipe."""
    m = {k: str(models / k) for k in ("base", "ft1", "ft2", "ft3")}
    return [
        {"name": "blend", "merge_method": "linear",
         "models": [{"model": m["ft1"], "parameters": {"weight": 0.5}},
                    {"model": m["ft2"], "parameters": {"weight": 0.5}}]},
        {"name": "moved", "merge_method": "task_arithmetic", "base_model": m["base"],
         "models": [{"model": "blend", "parameters": {"weight": 0.7}},
                    {"model": m["ft3"], "parameters": {"weight": 0.3}}]},
        {"merge_method": "linear", "models": [{"model": "moved", "parameters": {"weight": 0.6}},
                                              {"model": m["ft1"], "parameters": {"weight": 0.4}}]},
    ]


# Each mode in a fresh process: its peak RSS is its own; imports are paid by every mode alike.
CHILD = r"""
import json, resource, sys, time, yaml
from pathlib import Path
mode, recipe, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t = time.perf_counter()
if mode == "one-by-one":
    from merge_engine.merge import run_merge
    from merge_engine.recipe import parse_recipe
    folders = {}
    for doc in yaml.safe_load_all(recipe.read_text()):
        text = yaml.safe_dump(doc, sort_keys=False)
        for name, folder in folders.items():
            text = text.replace(f": {name}\n", f": {folder}\n")
        dest = out if "name" not in doc else out.parent / f"{out.name}.{doc['name']}"
        run_merge(parse_recipe(yaml.safe_load(text)), dest, device="cpu")
        if "name" in doc:
            folders[doc["name"]] = str(dest)
else:
    from merge_engine.multistage import run_stages
    from merge_engine.stages import load_stages
    run_stages(load_stages(recipe), out, device="cpu", memory_budget=0 if mode == "spilled" else None)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

MODES = ("in-memory", "one-by-one", "spilled")


def weights_hash(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--report", type=Path, default=REPO / "results" / "benchmarks" / "multistage_speed.md")
    args = ap.parse_args()
    if not (MODELS / "ft3").is_dir():
        print(f"{MODELS} is missing; run benchmarks/merge_speed.py once to build it", file=sys.stderr)
        return 2
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    recipe = WORK / "stages.yaml"
    recipe.write_text(yaml.safe_dump_all(stages(MODELS), sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    hashes: dict[str, set[str]] = {m: set() for m in MODES}
    for rep in range(args.repeats):
        for mode in MODES:
            out = WORK / f"out-{mode}"
            for old in WORK.glob(f"out-{mode}*"):
                shutil.rmtree(old)
            proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(recipe), str(out)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode].append(result)
            hashes[mode].add(weights_hash(out))
            print(f"repeat {rep + 1} {mode:11s} {result['seconds']:7.1f} s  peak RSS "
                  f"{result['peak_rss_gib']:.2f} GiB", flush=True)
            for old in WORK.glob(f"out-{mode}*"):
                shutil.rmtree(old)
    same = len(set().union(*hashes.values())) == 1
    base = statistics.median(r["seconds"] for r in runs["one-by-one"])
    lines = [
        "# Multi-stage merges: in memory vs stage by stage through disk",
        "",
        f"Generated by `benchmarks/multistage_speed.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({os.cpu_count()} CPUs, a machine shared with other jobs: compare ratios within this run). "
        "Recipe: three stages on the 1.06B Llama benchmark checkpoints (bf16, 2.1 GB each): "
        "linear(ft1, ft2) -> task_arithmetic(blend, ft3; base) -> linear(moved, ft1). Each mode in "
        f"its own process, modes alternating, {args.repeats} repeat(s); medians.",
        "",
        "| mode | seconds | vs one by one | peak RSS (GiB) |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        sec = statistics.median(r["seconds"] for r in runs[mode])
        rss = max(r["peak_rss_gib"] for r in runs[mode])
        lines.append(f"| {mode} | {sec:.1f} | {sec / base:.2f}x | {rss:.2f} |")
    lines += ["", f"Final weights identical in every mode and repeat: **{'yes' if same else 'NO'}** "
              f"({', '.join(sorted(set().union(*hashes.values())))}).", "",
              "- in-memory: `evomerge merge FILE OUT` (intermediates held as tensors, default budget).",
              "- one-by-one: each stage `run_merge` into a folder, the next stage reading that folder.",
              "- spilled: `--stage-memory 0` (intermediates written to a hidden folder beside OUT, "
              "removed at the end).", ""]
    args.report.write_text("\n".join(lines))
    shutil.rmtree(WORK, ignore_errors=True)
    print(f"wrote {args.report}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
