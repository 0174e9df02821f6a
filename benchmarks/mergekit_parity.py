#!/usr/bin/env python
"""Tensor-by-tensor parity of ``evomerge merge`` against ``mergekit-yaml`` on tiny real Llama checkpoints.

What it does
------------
1. Builds (once, cached) tiny LlamaForCausalLM checkpoints from a seeded LlamaConfig: a base and
   three fine-tunes (base + seeded correlated noise) in float32, and a bfloat16 copy of the set.
2. For every recipe template in ``benchmarks/mergekit_recipes/*.yml`` (``MODELS/`` is replaced by
   the model directory) runs mergekit (``mergekit-yaml`` of a separate venv, as a subprocess) and
   ``evomerge merge`` on the same recipe and compares every output tensor: names, shapes, dtypes,
   exact equality, elements equal, max abs diff.
   Templates marked ``# parity: stats`` use random masks (DARE/DELLA with density < 1): our
   seeded RNG differs from mergekit's global RNG by design, so those are compared statistically
   (fraction of elements left at the base value, and norm of the task vector).
3. Dumps each recipe through our engine (``load_recipe(p).to_yaml()``, which adds ``seed:``) and
   runs mergekit on the dump unchanged: it must be accepted and (for deterministic methods) give
   the same tensors as mergekit on the original.
4. Writes ``results/benchmarks/merge_parity.md``.

mergekit is a peer we measure against, never a dependency: it lives in its own venv
(``.venv-mergekit``; see benchmarks/README.md) and is only ever called as a subprocess.

Run:  .venv/bin/python benchmarks/mergekit_parity.py [--only linear,ties] [--no-dump-check]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parent / "mergekit_recipes"
DEFAULT_WORKDIR = Path.home() / ".cache" / "evomerge" / "parity"
DEFAULT_MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
DEFAULT_EVOMERGE = Path(sys.executable).parent / "evomerge"
DEFAULT_REPORT = REPO / "results" / "benchmarks" / "merge_parity.md"
MODEL_VERSION = "v2"  # bump when the tiny models change


# ---------------------------------------------------------------- tiny models
def build_models(root: Path) -> Path:
    """Seeded tiny Llama checkpoints under ``root/models-<version>``; built once, then reused."""
    models = root / f"models-{MODEL_VERSION}"
    if (models / "DONE").exists():
        return models
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).eval()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(4321)
    # task vectors: a shared direction plus an individual one, so signs partly agree (ties, sce,
    # model_stock have something to do) and magnitudes differ per model
    common = {k: torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
    sets = {"base": base_sd}
    for i in (1, 2, 3):
        scale = 0.004 * (1 + 0.5 * i)
        sets[f"ft{i}"] = {k: v + scale * (0.6 * common[k] + 0.8 * torch.randn(v.shape, generator=g))
                          for k, v in base_sd.items()}
    for i in (1, 2, 3):  # realistic fine-tune deltas: RMS ~3e-4
        sets[f"sft{i}"] = {k: v + 3e-4 * (0.6 * common[k] + 0.8 * torch.randn(v.shape, generator=g))
                           for k, v in base_sd.items()}
    for name, sd in sets.items():
        model.load_state_dict(sd)
        model.to(torch.float32).save_pretrained(models / name)
        model.to(torch.bfloat16).save_pretrained(models / f"bf16_{name}")
        model.to(torch.float32)
    (models / "DONE").write_text("ok\n")
    return models


# ---------------------------------------------------------------- running
@dataclass
class Run:
    ok: bool
    seconds: float
    error: str = ""


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error|Exception|assert)", ln):
            return ln[:300]
    return (lines[-1] if lines else "")[:300]


def run_cmd(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: int = 900) -> Run:
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -999
    seconds = time.perf_counter() - start
    if code == 0:
        return Run(True, seconds)
    return Run(False, seconds, ("timeout; " if code == -999 else "") + _last_error(log.read_text()))


def mergekit_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_mergekit(mergekit: Path, recipe: Path, out: Path, log: Path) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    return run_cmd([str(mergekit), str(recipe), str(out), "--no-copy-tokenizer", "--lazy-unpickle"],
                   log, env=mergekit_env())


def run_evomerge(evomerge: Path, recipe: Path, out: Path, log: Path) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return run_cmd([str(evomerge), "merge", str(recipe), str(out), "--device", "cpu", "--force"],
                   log, env=env)


# One process per tool for all recipes: importing mergekit or evomerge costs 5-80 s (more on a busy
# machine), the merges of tiny models well under a second. Each driver runs the tool's own
# entry point exactly as its CLI does and records, per job, ok/error and seconds.
MERGEKIT_DRIVER = r"""
import json, sys, time, traceback
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
jobs, results = json.load(open(sys.argv[1])), []
opts = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True)
opts.apply_global_options()
for recipe, out in jobs:  # same steps as mergekit-yaml RECIPE OUT --no-copy-tokenizer --lazy-unpickle
    t = time.perf_counter()
    try:
        src = open(recipe, encoding="utf-8").read()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(src)), out, options=opts,
                  config_source=src)
        results.append({"ok": True, "seconds": time.perf_counter() - t})
    except BaseException as e:
        traceback.print_exc()
        results.append({"ok": False, "seconds": time.perf_counter() - t,
                        "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:400]})
    json.dump(results, open(sys.argv[2], "w"))
"""

EVOMERGE_DRIVER = r"""
import contextlib, io, json, sys, time, traceback
from evomerge.cli import main
jobs, results = json.load(open(sys.argv[1])), []
for recipe, out in jobs:  # same as: evomerge merge RECIPE OUT --device cpu --force
    t = time.perf_counter()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["merge", recipe, out, "--device", "cpu", "--force"])
        results.append({"ok": code == 0, "seconds": time.perf_counter() - t,
                        "error": err.getvalue().strip().splitlines()[-1][:400] if code else ""})
    except BaseException as e:
        traceback.print_exc()
        results.append({"ok": False, "seconds": time.perf_counter() - t,
                        "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:400]})
    sys.stderr.write(err.getvalue())
    json.dump(results, open(sys.argv[2], "w"))
"""


def run_batch(python: Path, driver: str, jobs: list[tuple[Path, Path]], work: Path, tag: str,
              env: dict[str, str]) -> list[Run]:
    for _, out in jobs:
        shutil.rmtree(out, ignore_errors=True)
    jobs_file, res_file = work / f"{tag}-jobs.json", work / f"{tag}-results.json"
    jobs_file.write_text(json.dumps([[str(r), str(o)] for r, o in jobs]))
    res_file.unlink(missing_ok=True)
    run = run_cmd([str(python), "-c", driver, str(jobs_file), str(res_file)], work / f"{tag}.log",
                  env=env, timeout=3600)
    done = json.loads(res_file.read_text()) if res_file.exists() else []
    runs = [Run(d["ok"], d["seconds"], d.get("error", "")) for d in done]
    while len(runs) < len(jobs):  # the driver itself died
        runs.append(Run(False, 0.0, f"{tag} driver failed: {run.error}"))
    return runs


def dump_recipe(recipe: Path, dest: Path) -> str | None:
    """Our engine's dump of ``recipe`` (adds ``seed:``); returns an error text on failure."""
    try:
        from merge_engine.recipe import load_recipe

        dest.write_text(load_recipe(recipe).to_yaml())
    except Exception as err:  # noqa: BLE001 - reported in the table
        return f"{type(err).__name__}: {err}"[:300]
    return None


# ---------------------------------------------------------------- comparing
def load_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


@dataclass
class Compare:
    total: int = 0
    equal: int = 0
    elements: int = 0
    elements_equal: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: int = 0  # largest distance in units in the last place of the output dtype
    worst: str = ""
    missing: list[str] = field(default_factory=list)  # in mergekit's output, not ours
    extra: list[str] = field(default_factory=list)  # in ours, not mergekit's
    shape_mismatch: list[str] = field(default_factory=list)
    dtype_mismatch: list[str] = field(default_factory=list)
    per_tensor: list[tuple[str, float, int, int]] = field(default_factory=list)  # unequal ones

    @property
    def exact(self) -> bool:
        return (self.total > 0 and self.equal == self.total and not self.missing and not self.extra
                and not self.shape_mismatch and not self.dtype_mismatch)


_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
           torch.float64: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max number of representable values between ``a`` and ``b`` (same float dtype), elementwise."""
    if a.dtype != b.dtype or a.dtype not in _INT_OF:
        return -1
    ia, ib = (x.contiguous().view(_INT_OF[a.dtype]).to(torch.int64) for x in (a, b))
    bits = torch.finfo(a.dtype).bits
    # map sign-magnitude to a monotonic integer line
    ia = torch.where(ia < 0, -(ia & ((1 << (bits - 1)) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << (bits - 1)) - 1)), ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def compare_exact(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Compare:
    c = Compare()
    c.missing = sorted(set(theirs) - set(ours))
    c.extra = sorted(set(ours) - set(theirs))
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        c.total += 1
        if a.shape != b.shape:
            c.shape_mismatch.append(f"{name} {list(a.shape)} vs {list(b.shape)}")
            continue
        if a.dtype != b.dtype:
            c.dtype_mismatch.append(f"{name} {a.dtype} vs {b.dtype}")
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        eq = int((a64 == b64).sum())
        c.elements += a.numel()
        c.elements_equal += eq
        if eq == a.numel() and a.dtype == b.dtype:
            c.equal += 1
            continue
        diff = (a64 - b64).abs()
        mx = float(diff.max()) if diff.numel() else 0.0
        rel = mx / max(float(b64.abs().max()), 1e-30)
        c.max_ulp = max(c.max_ulp, ulp_distance(a, b))
        c.per_tensor.append((name, mx, eq, a.numel()))
        if mx >= c.max_abs:
            c.max_abs, c.worst = mx, name
        c.max_rel = max(c.max_rel, rel)
    return c


@dataclass
class Stats:
    """Random-mask methods: per tensor, fraction of elements equal to the base and ‖out − base‖."""

    tensors: int = 0
    max_frac_gap: float = 0.0
    frac_ours: float = 0.0
    frac_theirs: float = 0.0
    norm_ratio_min: float = float("inf")
    norm_ratio_max: float = 0.0
    worst: str = ""
    problems: list[str] = field(default_factory=list)


def compare_stats(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                  base: dict[str, torch.Tensor]) -> Stats:
    s = Stats()
    names = sorted(set(ours) & set(theirs) & set(base))
    if set(ours) != set(theirs):
        s.problems.append(f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:5]}")
    fo = ft = n_el = 0
    for name in names:
        a, b, z = (t.to(torch.float64) for t in (ours[name], theirs[name], base[name]))
        if a.shape != b.shape:
            s.problems.append(f"{name}: shape {list(a.shape)} vs {list(b.shape)}")
            continue
        s.tensors += 1
        fa, fb = float((a == z).double().mean()), float((b == z).double().mean())
        fo += fa * a.numel()
        ft += fb * a.numel()
        n_el += a.numel()
        na, nb = float((a - z).norm()), float((b - z).norm())
        if a.numel() >= 4096:  # small vectors (norms) are too noisy to judge one by one
            if abs(fa - fb) > s.max_frac_gap:
                s.max_frac_gap, s.worst = abs(fa - fb), name
            if nb > 0:
                s.norm_ratio_min = min(s.norm_ratio_min, na / nb)
                s.norm_ratio_max = max(s.norm_ratio_max, na / nb)
    s.frac_ours, s.frac_theirs = fo / max(n_el, 1), ft / max(n_el, 1)
    return s


# ---------------------------------------------------------------- one case
@dataclass
class Case:
    name: str
    method: str
    mode: str  # exact | stats
    note: str
    mk: Run | None = None
    ours: Run | None = None
    cmp: Compare | None = None
    stats: Stats | None = None
    dump: str = "not checked"
    dump_detail: str = ""
    diagnosis: str = ""


def read_template(path: Path, models: Path) -> tuple[str, str, str, str]:
    text = path.read_text()
    mode = (re.search(r"^# parity: (\w+)", text, re.M) or [None, "exact"])[1]
    note = (re.search(r"^# note: (.*)$", text, re.M) or [None, ""])[1]
    method = re.search(r"^merge_method: (\S+)", text, re.M)[1]
    body = text.replace("MODELS/", str(models) + "/")
    return body, mode, note, method


def run_cases(templates: list[Path], models: Path, work: Path, mergekit: Path, evomerge: Path,
              dump_check: bool, keep: bool, cli: bool) -> list[Case]:
    """Write every recipe (and our dump of it), run each tool over all of them, then compare."""
    cases, dirs = [], []
    for path in templates:
        body, mode, note, method = read_template(path, models)
        case = Case(path.stem, method, mode, note)
        cdir = work / "cases" / case.name
        shutil.rmtree(cdir, ignore_errors=True)
        cdir.mkdir(parents=True)
        (cdir / "recipe.yml").write_text(body)
        if dump_check:
            err = dump_recipe(cdir / "recipe.yml", cdir / "dumped.yml")
            if err:
                case.dump, case.dump_detail = "our dump failed", err
        cases.append(case)
        dirs.append(cdir)

    mk_jobs = [(d / "recipe.yml", d / "out-mergekit") for d in dirs]
    dump_idx = [i for i, d in enumerate(dirs) if (d / "dumped.yml").exists()]
    mk_jobs += [(dirs[i] / "dumped.yml", dirs[i] / "out-mergekit-dumped") for i in dump_idx]
    ours_jobs = [(d / "recipe.yml", d / "out-evomerge") for d in dirs]
    if cli:
        mk_runs = [run_mergekit(mergekit, r, o, o.parent / f"{o.name}.log") for r, o in mk_jobs]
        ours_runs = [run_evomerge(evomerge, r, o, o.parent / f"{o.name}.log") for r, o in ours_jobs]
    else:
        print(f"mergekit: {len(mk_jobs)} merges in one process ...", flush=True)
        mk_runs = run_batch(mergekit.parent / "python", MERGEKIT_DRIVER, mk_jobs, work, "mergekit",
                            mergekit_env())
        print(f"evomerge: {len(ours_jobs)} merges in one process ...", flush=True)
        ours_runs = run_batch(evomerge.parent / "python", EVOMERGE_DRIVER, ours_jobs, work, "evomerge",
                              dict(os.environ, HF_HUB_OFFLINE="1"))
    for i, case in enumerate(cases):
        case.mk, case.ours = mk_runs[i], ours_runs[i]
    for j, i in enumerate(dump_idx):
        case, cdir = cases[i], dirs[i]
        run = mk_runs[len(dirs) + j]
        has_seed = bool(re.search(r"^seed:", (cdir / "dumped.yml").read_text(), re.M))
        if not run.ok:
            case.dump, case.dump_detail = "REJECTED", run.error
        elif case.mode == "stats" or not case.mk.ok:
            case.dump = "accepted" + (" (seed key present)" if has_seed else "")
        else:
            same = compare_exact(load_tensors(cdir / "out-mergekit-dumped"), load_tensors(cdir / "out-mergekit"))
            case.dump = ("accepted, same tensors" if same.exact else
                         f"accepted, DIFFERENT tensors ({same.total - same.equal} differ)")
            if has_seed:
                case.dump += " (seed key present)"

    for case, cdir in zip(cases, dirs):
        body = (cdir / "recipe.yml").read_text()
        if case.mk.ok and case.ours.ok:
            ours, theirs = load_tensors(cdir / "out-evomerge"), load_tensors(cdir / "out-mergekit")
            if case.mode == "stats":
                base_dir = re.search(r"^base_model: (\S+)", body, re.M)[1]
                case.stats = compare_stats(ours, theirs, load_tensors(Path(base_dir)))
            else:
                case.cmp = compare_exact(ours, theirs)
            case.diagnosis = diagnose(case, ours, theirs, cdir)
        if not keep:
            for sub in ("out-mergekit", "out-evomerge", "out-mergekit-dumped"):
                shutil.rmtree(cdir / sub, ignore_errors=True)
        verdict = ("exact" if case.cmp and case.cmp.exact else
                   f"{case.cmp.equal}/{case.cmp.total} max {case.cmp.max_abs:.3g}" if case.cmp else
                   f"stats frac {case.stats.frac_ours:.4f}/{case.stats.frac_theirs:.4f}" if case.stats else
                   f"mk={fmt_run(case.mk)} ours={fmt_run(case.ours)}")
        print(f"{case.name:28s} {verdict:40s} dump: {case.dump}", flush=True)
    return cases


def diagnose(case: Case, ours: dict, theirs: dict, cdir: Path) -> str:
    """A short, factual description of where the outputs differ (the report's notes column)."""
    c = case.cmp
    if c is None or c.exact:
        return ""
    parts = []
    if c.missing:
        parts.append(f"missing in ours: {', '.join(c.missing[:4])}{' …' if len(c.missing) > 4 else ''}")
    if c.extra:
        parts.append(f"extra in ours: {', '.join(c.extra[:4])}{' …' if len(c.extra) > 4 else ''}")
    if c.shape_mismatch:
        parts.append(f"shape: {'; '.join(c.shape_mismatch[:3])}")
    if c.dtype_mismatch:
        parts.append(f"dtype (ours vs mergekit): {'; '.join(c.dtype_mismatch[:2])}"
                     f"{f' (+{len(c.dtype_mismatch) - 2} more)' if len(c.dtype_mismatch) > 2 else ''}")
    if c.per_tensor:
        kinds: dict[str, list] = {}
        for name, mx, eq, n in c.per_tensor:
            kind = re.sub(r"\.\d+\.", ".N.", name)
            kinds.setdefault(kind, []).append((mx, eq, n))
        summary = sorted(kinds.items(), key=lambda kv: -max(m for m, _, _ in kv[1]))[:4]
        parts.append("unequal: " + "; ".join(
            f"{k} ×{len(v)} (max {max(m for m, _, _ in v):.2e}, "
            f"{100 * sum(e for _, e, _ in v) / sum(n for _, _, n in v):.1f}% elements equal)"
            for k, v in summary))
    with open(cdir / "diff.json", "w") as fh:
        json.dump({"per_tensor": c.per_tensor, "missing": c.missing, "extra": c.extra,
                   "shape": c.shape_mismatch, "dtype": c.dtype_mismatch}, fh, indent=1)
    return " | ".join(parts)


# ---------------------------------------------------------------- report
def fmt_run(r: Run | None) -> str:
    return "—" if r is None else (f"{r.seconds:.1f}s" if r.ok else "FAILED")


def write_report(cases: list[Case], path: Path, args: argparse.Namespace, versions: dict) -> None:
    lines = [
        "# evomerge vs mergekit: merge parity",
        "",
        f"Generated by `benchmarks/mergekit_parity.py` on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"mergekit {versions.get('mergekit', '?')} (torch {versions.get('mk_torch', '?')}, "
        f"transformers {versions.get('mk_transformers', '?')}) in `.venv-mergekit`, "
        f"evomerge with torch {torch.__version__}.",
        "",
        "Models: tiny LlamaForCausalLM (4 layers, hidden 128, intermediate 344, 4 heads / 2 KV heads, "
        "vocab 384), seeded; fine-tunes = base + seeded correlated noise; float32 and bfloat16 "
        "sets. Recipes: `benchmarks/mergekit_recipes/` (`MODELS/` → the model directory). Each recipe "
        "is run by `mergekit-yaml RECIPE OUT --no-copy-tokenizer --lazy-unpickle` and by "
        "`evomerge merge RECIPE OUT --device cpu`, and every output tensor is compared.",
        "",
        "## Deterministic methods (bit-for-bit)",
        "",
        "| recipe | method | tensors equal exactly | elements equal | max abs diff | max ulp | worst tensor "
        "| mergekit / ours | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        if c.mode != "exact":
            continue
        if c.cmp is None:
            why = []
            if c.mk and not c.mk.ok:
                why.append(f"mergekit failed: {c.mk.error}")
            if c.ours and not c.ours.ok:
                why.append(f"evomerge failed: {c.ours.error}")
            lines.append(f"| {c.name} | {c.method} | — | — | — | — | — | {fmt_run(c.mk)} / {fmt_run(c.ours)} "
                         f"| {c.note}. **{'; '.join(why)}** |")
            continue
        m = c.cmp
        verdict = f"**exact** ({m.equal}/{m.total})" if m.exact else f"{m.equal}/{m.total}"
        el = f"{100 * m.elements_equal / max(m.elements, 1):.3f}%"
        lines.append(f"| {c.name} | {c.method} | {verdict} | {el} | {m.max_abs:.3g} | {m.max_ulp} "
                     f"| {m.worst or '—'} | {fmt_run(c.mk)} / {fmt_run(c.ours)} | {c.note}"
                     f"{'. ' + c.diagnosis if c.diagnosis else ''} |")
    stats = [c for c in cases if c.mode == "stats"]
    if stats:
        lines += [
            "",
            "## Random-mask methods (statistical)",
            "",
            "Our masks come from generators seeded by (recipe seed, tensor name, model index); mergekit "
            "draws from torch's global RNG, so element-wise equality is not expected. Compared instead: "
            "the fraction of elements left exactly at the base value (dropped in every model), and the "
            "ratio ‖ours − base‖ / ‖mergekit − base‖ per tensor (tensors with ≥ 4096 elements).",
            "",
            "| recipe | method | elements at base: ours / mergekit | max per-tensor gap | "
            "norm ratio range | mergekit / ours | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in stats:
            if c.stats is None:
                why = [f"{who} failed: {r.error}" for who, r in (("mergekit", c.mk), ("evomerge", c.ours))
                       if r and not r.ok]
                lines.append(f"| {c.name} | {c.method} | — | — | — | {fmt_run(c.mk)} / {fmt_run(c.ours)} | "
                             f"{c.note}. **{'; '.join(why)}** |")
                continue
            s = c.stats
            rng = (f"{s.norm_ratio_min:.3f} – {s.norm_ratio_max:.3f}"
                   if s.norm_ratio_max > 0 else "—")
            lines.append(f"| {c.name} | {c.method} | {100 * s.frac_ours:.2f}% / {100 * s.frac_theirs:.2f}% "
                         f"| {100 * s.max_frac_gap:.2f} pts ({s.worst}) | {rng} | "
                         f"{fmt_run(c.mk)} / {fmt_run(c.ours)} | {c.note}"
                         f"{'. ' + '; '.join(s.problems) if s.problems else ''} |")
    if any(c.dump != "not checked" for c in cases):
        lines += [
            "",
            "## Recipes dumped by our engine, run by mergekit unchanged",
            "",
            "`merge_engine.recipe.load_recipe(p).to_yaml()` (adds a top-level `seed:`) → "
            "`mergekit-yaml DUMP OUT`; for deterministic methods the output is compared with mergekit's "
            "output for the original recipe.",
            "",
            "| recipe | mergekit on our dump | detail |",
            "|---|---|---|",
        ]
        for c in cases:
            lines.append(f"| {c.name} | {c.dump} | {c.dump_detail} |")
    lines += ["", "## Findings", "", "<!-- findings -->", ""]
    old = path.read_text() if path.exists() else ""
    if "<!-- findings -->" in old:  # keep the hand-written analysis between runs
        lines[-1:] = [old.split("<!-- findings -->", 1)[1].strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def mergekit_versions(mergekit: Path) -> dict:
    py = mergekit.parent / "python"
    code = ("import importlib.metadata as m, json; print(json.dumps({k: m.version(v) for k, v in "
            "[('mergekit','mergekit'),('mk_torch','torch'),('mk_transformers','transformers')]}))")
    try:
        out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=mergekit_env())
        return json.loads(out.stdout)
    except Exception:  # noqa: BLE001 - versions are informative only
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="mergekit-yaml executable")
    ap.add_argument("--evomerge", type=Path, default=DEFAULT_EVOMERGE, help="evomerge executable")
    ap.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    ap.add_argument("--only", default="", help="comma-separated recipe names (file stems)")
    ap.add_argument("--no-dump-check", action="store_true", help="skip running mergekit on our dumps")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs under --workdir")
    ap.add_argument("--cli", action="store_true",
                    help="run mergekit-yaml and evomerge merge once per recipe (slow: one import each) "
                         "instead of one process per tool for all recipes")
    args = ap.parse_args()

    if not args.mergekit.exists():
        print(f"mergekit not found at {args.mergekit}; see benchmarks/README.md to install it in "
              ".venv-mergekit", file=sys.stderr)
        return 2
    models = build_models(args.workdir)
    templates = sorted(RECIPES.glob("*.yml"))
    if args.only:
        wanted = set(args.only.split(","))
        templates = [t for t in templates if t.stem in wanted]
    cases = run_cases(templates, models, args.workdir, args.mergekit, args.evomerge,
                      not args.no_dump_check, args.keep, args.cli)
    if args.only and args.report == DEFAULT_REPORT:
        print("(--only given: report not written)")
        return 0
    write_report(cases, args.report, args, mergekit_versions(args.mergekit))
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
