#!/usr/bin/env python
"""Merge speed and memory of ``evomerge merge`` vs an I/O floor and vs ``mergekit-yaml``, on a ~1B model.

What it does
------------
1. Builds (once, cached under ``~/.cache/evomerge/bench``, never in the repo) a Llama-shaped bf16
   checkpoint with random weights (hidden 2048, 18 layers, intermediate 5632, 16 heads, vocab 32000,
   untied lm_head: 1.06B parameters, 2.1 GB) and three fine-tunes (base + seeded noise), each in two
   safetensors shards with an index, written tensor by tensor (no model is instantiated).
2. Measures, in the same run on the same files:
   - the I/O floor: a worker that reads every byte of all four inputs once (``readinto`` a reused
     buffer) and writes as many bytes as one model holds;
   - Python start-up: ``python -c "import torch, safetensors"``, the fixed cost of any Python
     merge tool, which the floor does not pay;
   - ``evomerge merge RECIPE OUT --device cpu`` and ``mergekit-yaml RECIPE OUT --lazy-unpickle
     --no-copy-tokenizer`` (CPU) for linear, ties and dare_ties recipes over the same four inputs,
   each under ``/usr/bin/time -v`` (peak RSS = ru_maxrss, which counts touched pages of mmapped
   files) while a poller samples the process tree's anonymous RSS (private memory). ``evomerge
   merge`` also prints its own merge time (validation to publish, after start-up), which is what
   the I/O floor target is checked against.
   Runs alternate (floor, ours, mergekit, …) and ``sync`` runs before each one so one run's
   write-back does not land in the next one's time. Outputs are deleted after every run.
3. Writes ``results/benchmarks/merge_speed.md`` (machine, commands, every run, ratios).

Run:  .venv/bin/python benchmarks/merge_speed.py [--repeats 2] [--methods linear,ties,dare_ties]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path.home() / ".cache" / "evomerge" / "bench"
DEFAULT_MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
DEFAULT_EVOMERGE = Path(sys.executable).parent / "evomerge"
DEFAULT_REPORT = REPO / "results" / "benchmarks" / "merge_speed.md"

SHAPE = dict(hidden=2048, layers=18, intermediate=5632, heads=16, kv_heads=16, vocab=32000)
CKPT_VERSION = "llama1b-v1"
MODELS = ("base", "ft1", "ft2", "ft3")

RECIPES = {
    "linear": """merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.4}}
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.2}}
  - model: {ft3}
    parameters: {{weight: 0.1}}
dtype: bfloat16
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.2, density: 0.5}}
dtype: bfloat16
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.2, density: 0.5}}
dtype: bfloat16
""",
    "della": """merge_method: della
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.5, epsilon: 0.1}}
  - model: {ft3}
    parameters: {{weight: 0.2, density: 0.5, epsilon: 0.1}}
dtype: bfloat16
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5, gamma: 0.01}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.5, gamma: 0.01}}
  - model: {ft3}
    parameters: {{weight: 0.2, density: 0.5, gamma: 0.01}}
dtype: bfloat16
""",
    "sce": """merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters: {{select_topk: 0.5}}
dtype: bfloat16
""",
}
# the issue's other variants: the same parameters, without sign election
RECIPES["della_linear"] = RECIPES["della"].replace("merge_method: della", "merge_method: della_linear")
RECIPES["breadcrumbs"] = RECIPES["breadcrumbs_ties"].replace("merge_method: breadcrumbs_ties",
                                                            "merge_method: breadcrumbs")


# ---------------------------------------------------------------- checkpoints
def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    kv = h // SHAPE["heads"] * SHAPE["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(SHAPE["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def llama_config() -> dict:
    h = SHAPE["hidden"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": SHAPE["intermediate"], "num_hidden_layers": SHAPE["layers"],
        "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["kv_heads"],
        "head_dim": h // SHAPE["heads"], "vocab_size": SHAPE["vocab"], "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "initializer_range": 0.02,
    }


def build_checkpoints(cache: Path) -> Path:
    """Base + 3 fine-tunes, bf16, 2 shards each; built once (a DONE marker), then reused."""
    import torch
    from safetensors.torch import save_file

    root = cache / CKPT_VERSION
    if all((root / m / "DONE").exists() for m in MODELS):
        return root
    shapes = tensor_shapes()
    total = sum(_numel(s) for _, s in shapes)
    half = total // 2
    for idx, name in enumerate(MODELS):
        d = root / name
        if (d / "DONE").exists():
            continue
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        print(f"building {d} ...", flush=True)
        t0 = time.perf_counter()
        gb = torch.Generator().manual_seed(1000)  # the base's stream, replayed for every model
        gf = torch.Generator().manual_seed(2000 + idx)
        weight_map, shard, shard_no, seen = {}, {}, 1, 0
        files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for tname, shape in shapes:
            if len(shape) == 1:
                t = torch.ones(shape) + 0.01 * torch.randn(shape, generator=gb)
            else:
                t = torch.randn(shape, generator=gb).mul_(0.02)
            if name != "base":
                t.add_(torch.randn(shape, generator=gf), alpha=0.002)
            shard[tname] = t.to(torch.bfloat16)
            del t
            weight_map[tname] = files[shard_no - 1]
            seen += _numel(shape)
            if shard_no == 1 and seen >= half:
                save_file(shard, str(d / files[0]), metadata={"format": "pt"})
                shard, shard_no = {}, 2
        save_file(shard, str(d / files[1]), metadata={"format": "pt"})
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=1))
        (d / "config.json").write_text(json.dumps(llama_config(), indent=1))
        (d / "DONE").write_text("ok\n")
        print(f"  {time.perf_counter() - t0:.0f}s", flush=True)
    return root


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------- floor worker
def floor_raw(inputs: list[Path], out: Path) -> None:
    """Read every input file byte once; write as many bytes as one input holds."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    out.mkdir(parents=True, exist_ok=True)
    first = sorted(inputs[0].glob("*.safetensors"))
    with open(out / "model.bin", "wb") as dst:
        for i, d in enumerate(inputs):
            for f in sorted(d.glob("*.safetensors")):
                with open(f, "rb", buffering=0) as src:
                    while n := src.readinto(buf):
                        if i == 0 and f in first:
                            dst.write(view[:n])


# ---------------------------------------------------------------- measuring
@dataclass
class Measure:
    label: str
    kind: str  # floor_raw | startup | ours | mergekit
    method: str
    seconds: float
    maxrss_mb: float  # ru_maxrss of the measured process (includes mmapped file pages)
    peak_anon_mb: float  # peak sum of RssAnon over the process tree (private memory)
    ok: bool
    user_s: float = 0.0
    sys_s: float = 0.0
    error: str = ""
    cpu_s: float = 0.0
    load: str = ""  # /proc/loadavg (1 min) before the run: other work on the machine skews times
    inner_s: float | None = None  # evomerge's own "merged ... in X s" (after Python start-up)


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _tree_anon_kb(pid: int) -> int:
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
                        break
            with open(f"/proc/{p}/task/{p}/children") as fh:
                stack += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def measure(label: str, kind: str, method: str, cmd: list[str], env: dict | None, logdir: Path) -> Measure:
    subprocess.run(["sync"], check=False)
    load = loadavg()
    tv = logdir / f"{label}.time"
    log = logdir / f"{label}.log"
    full = ["/usr/bin/time", "-v", "-o", str(tv)] + cmd
    peak = [0]
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_anon_kb(proc.pid))
                done.wait(0.05)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            code = proc.wait()
        except BaseException:  # interrupted (Ctrl-C / SIGTERM): stop the measured command too
            done.set()
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        seconds = time.perf_counter() - start
        done.set()
        th.join()
    text = tv.read_text() if tv.exists() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    syst = re.search(r"System time \(seconds\): ([\d.]+)", text)
    err = ""
    if code != 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "")[:300]
    inner = re.search(r"merged \d+ tensors into .* in ([\d.]+)s", log.read_text())
    m = Measure(label, kind, method, seconds, int(rss[1]) / 1024 if rss else 0.0, peak[0] / 1024,
                code == 0, float(user[1]) if user else 0.0, float(syst[1]) if syst else 0.0, err, load=load,
                inner_s=float(inner[1]) if inner else None)
    status = "ok" if m.ok else f"FAILED: {err}"
    print(f"  {label:28s} {seconds:7.1f}s  maxrss {m.maxrss_mb:7.0f} MB  anon {m.peak_anon_mb:7.0f} MB  "
          f"user {m.user_s:.0f}s sys {m.sys_s:.0f}s  load {load}  {status}", flush=True)
    return m


def cached_fraction(root: Path) -> str:
    """Share of the input bytes in the page cache (fincore), e.g. '100%'."""
    files = [str(f) for m in MODELS for f in sorted((root / m).glob("*.safetensors"))]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE"] + files,
                             capture_output=True, text=True, check=True).stdout
        res = size = 0
        for line in out.splitlines():
            r, s = line.split()[:2]
            res, size = res + int(r), size + int(s)
        return f"{100 * res / max(size, 1):.0f}%"
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def machine() -> dict:
    info = {"cpu": "unknown", "cores": os.cpu_count(), "mem_gib": 0.0}
    try:
        cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = cpu[1] if cpu else "unknown"
        flags = re.search(r"flags\s*: (.*)", Path("/proc/cpuinfo").read_text())[1].split()
        info["simd"] = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        info["mem_gib"] = int(mem[1]) / 2**20
    except Exception:  # noqa: BLE001
        pass
    info["python"] = platform.python_version()
    info["kernel"] = platform.release()
    return info


def versions(py: Path, pkgs: tuple[str, ...]) -> dict:
    code = ("import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in "
            "sys.argv[1:]}))")
    try:
        return json.loads(subprocess.run([str(py), "-c", code, *pkgs], capture_output=True,
                                         text=True, check=True).stdout)
    except Exception:  # noqa: BLE001
        return {}


# ---------------------------------------------------------------- report
def med(ms: list[Measure], attr: str) -> float | None:
    vals = [getattr(m, attr) for m in ms if m.ok]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


def ratio(a: float | None, b: float | None, target: float | None = None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    mark = "" if target is None else (" ✅" if r <= target else " ❌")
    return f"{r:.2f}x{mark}"


def write_report(path: Path, runs: list[Measure], ctx: dict) -> None:
    by = lambda kind, method="": [m for m in runs if m.kind == kind and (not method or m.method == method)]  # noqa: E731
    floor = med(by("floor_raw"), "seconds")
    startup = med(by("startup"), "seconds")
    both = floor + startup if floor is not None and startup is not None else None
    mi = ctx["machine"]
    lines = [
        "# Merge speed and memory: evomerge vs I/O floor vs mergekit",
        "",
        f"Generated by `benchmarks/merge_speed.py` on {ctx['date']} (whole run {ctx['total_min']:.1f} min)"
        + (" — **interrupted: partial results**." if ctx.get("interrupted") else "."),
        "",
        "## Machine and inputs",
        "",
        f"- CPU: {mi.get('cpu')} ({mi.get('cores')} cores; {mi.get('simd', '')}), RAM {mi.get('mem_gib', 0):.1f} GiB, "
        f"no GPU; Linux {mi.get('kernel')}, Python {mi.get('python')}.",
        f"- evomerge: torch {ctx['ours_versions'].get('torch', '?')}, safetensors "
        f"{ctx['ours_versions'].get('safetensors', '?')}; mergekit {ctx['mk_versions'].get('mergekit', '?')} "
        f"(torch {ctx['mk_versions'].get('torch', '?')}, transformers {ctx['mk_versions'].get('transformers', '?')}) "
        "in its own venv.",
        f"- Inputs: 4 Llama-shaped bf16 checkpoints (base + 3 fine-tunes), {ctx['params'] / 1e9:.3f}B parameters "
        f"each ({ctx['bytes'] / 1e9:.2f} GB, 2 shards), random weights: hidden {SHAPE['hidden']}, "
        f"{SHAPE['layers']} layers, intermediate {SHAPE['intermediate']}, {SHAPE['heads']} heads, "
        f"vocab {SHAPE['vocab']}, untied lm_head. Cached in `{ctx['root']}`.",
        f"- Page cache: the inputs were {ctx['cached_before']} resident before the first measured run and "
        f"{ctx['cached_after']} after the last (24 GiB RAM holds all four inputs plus one output), so every "
        "run reads **warm** files: the floor is a memory-bandwidth + write floor, not a disk floor. The "
        "page cache cannot be dropped without privileges. Outputs are written to the page cache (no "
        "fsync by either tool or the floor); `sync` runs before each measured run so one run's "
        "write-back does not fall into the next run's time.",
        "- Order: the runs alternate (floor and start-up, then each method: ours/mergekit, order flipped on "
        "every repeat, then the floor again); medians are reported.",
        "",
        "## Results",
        "",
        f"I/O floor (`readinto` every byte of the 4 inputs, write {ctx['bytes'] / 1e9:.2f} GB): "
        f"**{fmt(floor)} s** (median of {len(by('floor_raw'))}). Python start-up "
        f"(`python -c \"import torch, safetensors\"`): **{fmt(startup)} s** (median of {len(by('startup'))}); "
        "every Python merge tool pays it and the floor does not.",
        "",
        "| method | ours wall s | ours merge s (after start-up) | mergekit s | ours merge / I/O floor "
        "(target: linear ≤ 1.5x, others ≤ 5x) | ours wall / (floor + start-up) | ours / mergekit time (target ≤ 0.5x) | "
        "ours / mergekit CPU s (user+sys) | "
        "ours peak RSS MB | mergekit peak RSS MB | RSS ratio (target ≤ 1x) | ours / mergekit private (anon) MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in runs:
        m.cpu_s = m.user_s + m.sys_s
    for method in ctx["methods"]:
        o, k = by("ours", method), by("mergekit", method)
        to, tk = med(o, "seconds"), med(k, "seconds")
        ro, rk = med(o, "maxrss_mb"), med(k, "maxrss_mb")
        ao, ak = med(o, "peak_anon_mb"), med(k, "peak_anon_mb")
        target = 1.5 if method == "linear" else 5.0
        co, ck = med(o, "cpu_s"), med(k, "cpu_s")
        inner = statistics.median(v) if (v := [m.inner_s for m in o if m.ok and m.inner_s is not None]) else None
        lines.append(f"| {method} | {fmt(to)} | {fmt(inner)} | {fmt(tk)} | {ratio(inner, floor, target)} "
                     f"| {ratio(to, both)} | {ratio(to, tk, 0.5)} "
                     f"| {fmt(co, '.0f')} / {fmt(ck, '.0f')} ({ratio(co, ck)}) "
                     f"| {fmt(ro, '.0f')} | {fmt(rk, '.0f')} | {ratio(ro, rk, 1.0)} | {fmt(ao, '.0f')} / {fmt(ak, '.0f')} |")
    if ctx.get("torch_baseline"):
        lines += ["", "Before/after the native kernels, side by side in this run: `torch path` is the same "
                  "`evomerge merge` with `EVOMERGE_NATIVE=0` (the code path every method but linear used "
                  "before; same output bits).", "",
                  "| method | torch path merge s | ours merge s | torch path / floor | ours / floor | speed-up |",
                  "|---|---|---|---|---|---|"]
        for method in ctx["methods"]:
            t = [m.inner_s for m in by("torch", method) if m.ok and m.inner_s is not None]
            o = [m.inner_s for m in by("ours", method) if m.ok and m.inner_s is not None]
            if not t or not o:
                continue
            ts, os_ = statistics.median(t), statistics.median(o)
            lines.append(f"| {method} | {fmt(ts)} | {fmt(os_)} | {ratio(ts, floor)} | {ratio(os_, floor, 5.0)} "
                         f"| {ts / os_:.1f}x |")
    if ctx.get("baseline_rev"):
        rev = ctx["baseline_rev"]
        lines += ["", f"Before/after this change, side by side in this run: `old` is the same merge run by "
                  f"commit {rev}'s code (alternating with ours); CPU s = user + sys of the process.", "",
                  "| method | old merge s | ours merge s | old / floor | ours / floor | speed-up (merge s) "
                  "| old CPU s | ours CPU s | CPU ratio old / ours | outputs identical |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in ctx["methods"]:
            t = [m for m in by("old", method) if m.ok and m.inner_s is not None]
            o = [m for m in by("ours", method) if m.ok and m.inner_s is not None]
            if not t or not o:
                continue
            ts, os_ = statistics.median(m.inner_s for m in t), statistics.median(m.inner_s for m in o)
            tc, oc = statistics.median(m.cpu_s for m in t), statistics.median(m.cpu_s for m in o)
            same = ctx["identical"].get(method)
            lines.append(f"| {method} | {fmt(ts)} | {fmt(os_)} | {ratio(ts, floor)} | {ratio(os_, floor, 5.0)} "
                         f"| {ts / os_:.2f}x | {tc:.1f} | {oc:.1f} | {tc / oc:.2f}x "
                         f"| {'yes' if same else ('NO' if same is False else '?')} |")
    loads = [float(m.load) for m in runs if m.load not in ("", "?")]
    if loads and max(loads) > 1.5:
        lines += ["", f"**Warning: the machine was busy** (1-min load average up to {max(loads):.1f} before a "
                  "run on 2 cores): wall times are inflated by other work; CPU times are less affected."]
    lines += [
        "",
        "Target for ours / floor: linear ≤ 1.5x, checked on the merge time `evomerge merge` prints (validation "
        "to publish); the wall column adds interpreter start-up and the torch import. Peak RSS is `ru_maxrss` "
        "from `/usr/bin/time -v`; it counts "
        "pages of memory-mapped input files the process touched, so it is also shown as private (anonymous) "
        "memory, sampled every 50 ms over the process tree.",
        "",
        "## Every run",
        "",
        "| # | run | wall s | user s | sys s | peak RSS MB | peak anon MB | load before | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, m in enumerate(runs, 1):
        lines.append(f"| {i} | {m.label} | {m.seconds:.1f} | {m.user_s:.1f} | {m.sys_s:.1f} | {m.maxrss_mb:.0f} "
                     f"| {m.peak_anon_mb:.0f} | {m.load} | {'ok' if m.ok else 'FAILED: ' + m.error} |")
    lines += ["", "## Commands", "", "```bash"]
    lines += ctx["commands"]
    lines += ["```", "", "## Findings", "", "<!-- findings -->", ""]
    old = path.read_text() if path.exists() else ""
    if "<!-- findings -->" in old:  # keep the hand-written analysis between runs
        lines[-1:] = [old.split("<!-- findings -->", 1)[1].strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the checkpoints live")
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT)
    ap.add_argument("--evomerge", type=Path, default=DEFAULT_EVOMERGE)
    ap.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of the floor and of linear")
    ap.add_argument("--heavy-repeats", type=int, default=1, help="repeats of the other methods")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--torch-baseline", default="",
                    help="comma-separated methods also run with EVOMERGE_NATIVE=0 (the torch path, as "
                         "before the native kernels), side by side")
    ap.add_argument("--baseline-rev", default="",
                    help="also run every method with this git revision's code (exported to a temp dir, "
                         "run by the same python with PYTHONPATH pointing at it), alternating with ours; "
                         "reports merge and CPU seconds side by side and whether the outputs are identical")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="a ~20M-parameter model instead of ~1B: checks the script end to end in a minute")
    ap.add_argument("--floor-worker", choices=("raw",), help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.floor_worker:
        *inputs, out = (Path(p) for p in args.paths)
        floor_raw(inputs, out)
        return 0

    t_start = time.perf_counter()
    if args.smoke:
        global CKPT_VERSION
        SHAPE.update(hidden=256, layers=4, intermediate=688, heads=4, kv_heads=4, vocab=8000)
        CKPT_VERSION = "smoke-v1"
        if args.report == DEFAULT_REPORT:
            args.report = args.cache / "smoke-report.md"
    root = build_checkpoints(args.cache)
    if args.build_only:
        return 0
    methods = [m for m in args.methods.split(",") if m]
    work = args.cache / f"work-{CKPT_VERSION}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    paths = {m: str(root / m) for m in MODELS}
    recipes = {}
    for method in methods:
        recipes[method] = work / f"{method}.yml"
        recipes[method].write_text(RECIPES[method].format(**paths))
    out = work / "out"
    inputs = [paths[m] for m in MODELS]
    py = sys.executable
    ours_env = dict(os.environ, HF_HUB_OFFLINE="1")
    mk_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    mk_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    here = str(Path(__file__).resolve())
    cmd = {
        "floor_raw": lambda m: [py, here, "--floor-worker", "raw", *inputs, str(out)],
        "startup": lambda m: [py, "-c", "import torch, safetensors"],
        "ours": lambda m: [str(args.evomerge), "merge", str(recipes[m]), str(out), "--device", "cpu", "--force"],
        "mergekit": lambda m: [str(args.mergekit), str(recipes[m]), str(out), "--lazy-unpickle",
                               "--no-copy-tokenizer"],
    }
    env = {"floor_raw": ours_env, "startup": ours_env, "ours": ours_env, "mergekit": mk_env,
           "torch": dict(ours_env, EVOMERGE_NATIVE="0")}
    cmd["torch"] = cmd["ours"]
    old_dir = None
    if args.baseline_rev:  # the old commit's code, run as a module by the same interpreter
        old_dir = Path(tempfile.mkdtemp(prefix="merge-speed-baseline-"))
        subprocess.run(f"git -C {REPO} archive {args.baseline_rev} | tar -x -C {old_dir}", shell=True, check=True)
        # -P: `python -m` would otherwise put the working directory (often a checkout) ahead of
        # PYTHONPATH on sys.path, and both sides would run that checkout's code
        cmd["old"] = lambda m: [py, "-P", "-m", "evomerge.cli", "merge", str(recipes[m]), str(out), "--device",
                                "cpu", "--force"]
        env["old"] = dict(ours_env, PYTHONPATH=str(old_dir))
        cmd["ours"] = lambda m: [py, "-P", "-m", "evomerge.cli", "merge", str(recipes[m]), str(out), "--device",
                                 "cpu", "--force"]
        env["ours"] = dict(ours_env, PYTHONPATH=str(REPO))
        for kind in ("old", "ours"):  # build each tree's native kernels now, not inside a measured run
            subprocess.run([py, "-P", "-c", "import sys; from merge_engine import native; native.available(); "
                            "print(native.__file__, file=sys.stderr)"], env=env[kind], check=True)
    runs: list[Measure] = []
    n = [0]
    identical: dict[str, bool] = {}

    def go(kind: str, method: str = "") -> None:
        shutil.rmtree(out, ignore_errors=True)
        n[0] += 1
        label = f"{n[0]:02d}-{kind}{'-' + method if method else ''}"
        runs.append(measure(label, kind, method, cmd[kind](method), env[kind], work / "logs"))
        if old_dir is not None and kind in ("old", "ours") and out.exists():
            other = work / f"kept-{'ours' if kind == 'old' else 'old'}-{method}"
            if other.exists():  # the other side ran already: compare every weight file byte for byte
                files = sorted(p.name for p in out.glob("*.safetensors"))
                identical[method] = identical.get(method, True) and bool(files) and files == sorted(
                    p.name for p in other.glob("*.safetensors")) and all(
                    filecmp.cmp(out / f, other / f, shallow=False) for f in files)
                shutil.rmtree(other, ignore_errors=True)
            else:
                shutil.move(str(out), str(work / f"kept-{kind}-{method}"))
        shutil.rmtree(out, ignore_errors=True)

    # warm the page cache so every run sees the same (warm) state
    go("floor_raw")
    runs.pop()
    cached_before = cached_fraction(root)
    print(f"inputs in page cache: {cached_before}", flush=True)
    tools = ["ours"] + ([] if args.no_mergekit else ["mergekit"])
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    interrupted = False
    try:
        for rep in range(max(args.repeats, args.heavy_repeats)):
            go("floor_raw")
            go("startup")
            for method in methods:
                if rep >= (args.repeats if method == "linear" else args.heavy_repeats):
                    continue
                kinds = tools + (["torch"] if method in args.torch_baseline.split(",") else []) + (
                    ["old"] if old_dir is not None else [])
                for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                    go(kind, method)
        go("floor_raw")
        go("startup")
    except KeyboardInterrupt:  # write what was measured so far
        interrupted = True
        print("interrupted: writing a partial report", flush=True)
        for tmp in work.glob(".out.tmp-*"):  # an interrupted evomerge run's temp output
            shutil.rmtree(tmp, ignore_errors=True)
    cached_after = cached_fraction(root)
    shutil.rmtree(work / "out", ignore_errors=True)
    for kept in work.glob("kept-*"):
        shutil.rmtree(kept, ignore_errors=True)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)

    params = sum(_numel(s) for _, s in tensor_shapes())
    commands = [
        f"# checkpoints: {root}/{{base,ft1,ft2,ft3}}; recipes: {work}/<method>.yml (printed below)",
        f"{py} {here} --floor-worker raw {' '.join(inputs)} OUT",
        f"{py} -c 'import torch, safetensors'",
        *[f"{args.evomerge} merge {recipes[m]} OUT --device cpu --force" for m in methods],
        *([] if args.no_mergekit else
          [f"{args.mergekit} {recipes[m]} OUT --lazy-unpickle --no-copy-tokenizer" for m in methods]),
        *(["# torch baseline: the same evomerge commands with EVOMERGE_NATIVE=0"] if args.torch_baseline else []),
        *([f"# baseline: git archive {args.baseline_rev} into a temp dir; ours and it run as "
           f"`PYTHONPATH=<tree> {py} -P -m evomerge.cli merge RECIPE OUT --device cpu --force`"]
          if args.baseline_rev else []),
        "# each wrapped as: sync; /usr/bin/time -v -o TIMEFILE <command>",
        "",
        *[f"# {m}.yml\n" + "\n".join("#   " + ln for ln in recipes[m].read_text().splitlines())
          for m in methods],
    ]
    ctx = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "root": root, "params": params,
        "bytes": params * 2, "cached_before": cached_before, "cached_after": cached_after,
        "methods": methods, "commands": commands, "torch_baseline": args.torch_baseline,
        "baseline_rev": args.baseline_rev, "identical": identical,
        "ours_versions": versions(Path(py), ("torch", "safetensors")),
        "mk_versions": versions(args.mergekit.parent / "python", ("mergekit", "torch", "transformers"))
        if not args.no_mergekit else {},
        "total_min": (time.perf_counter() - t_start) / 60, "interrupted": interrupted,
    }
    write_report(args.report, runs, ctx)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
