#!/usr/bin/env python
"""``evomerge moe`` beside ``mergekit-moe`` on the same configs and tiny real Llama checkpoints.

1. Builds (once, cached) a tiny Llama base with a tokenizer and three fine-tunes of it
   (``tests/fixtures.py``'s builders).
2. For every config in ``benchmarks/mergekit_recipes/moe/*.yml`` (``MODELS/`` replaced by the model
   folder) runs ``mergekit-moe`` (the separate ``.venv-mergekit``, as a subprocess, on the CPU)
   and ``evomerge moe`` (this venv, same config, ``--device cpu``, routers computed in bfloat16
   as mergekit does).
3. Compares the outputs tensor by tensor: tensors outside the experts and routers, the experts
   (mergekit 0.1.5 writes Mixtral experts fused as ``experts.gate_up_proj``/``down_proj``: split
   back per expert here), and the router rows (max abs difference and cosine). Configs marked
   ``# parity: stats`` draw random numbers (ours seeded, mergekit's global RNG): only shapes, the
   deterministic tensors and the noise's size are compared. Both outputs are loaded in this
   venv's transformers and their logits on a fixed input compared.
4. Writes ``results/benchmarks/moe_parity.md``.

Run:  .venv/bin/python benchmarks/moe_parity.py [--mergekit PATH/mergekit-moe] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
CONFIGS = Path(__file__).resolve().parent / "mergekit_recipes" / "moe"
DEFAULT_WORKDIR = Path.home() / ".cache" / "evomerge" / "moe_parity"
DEFAULT_MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-moe"
DEFAULT_REPORT = REPO / "results" / "benchmarks" / "moe_parity.md"
MODEL_VERSION = "v1"
IDS = torch.tensor([[1, 40, 41, 42, 69, 70, 71, 5, 6, 33, 34, 35]])


def build_models(root: Path) -> Path:
    from fixtures import make_tiny_llama

    models = root / f"models-{MODEL_VERSION}"
    if (models / "DONE").exists():
        return models
    shutil.rmtree(models, ignore_errors=True)
    base = make_tiny_llama(models / "base", 0, num_layers=4, hidden=128, heads=4, intermediate=256)
    for i in (1, 2, 3):
        make_tiny_llama(models / f"ft{i}", i, perturb_from=base, scale=0.02)
    (models / "DONE").write_text("ok\n")
    return models


def run(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[bool, float, str]:
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or [""]
    return code == 0, time.perf_counter() - start, tail[0][:200]


def tensors(out: Path) -> dict[str, torch.Tensor]:
    from fixtures import load_state

    return load_state(out)


def unfuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's fused Mixtral experts as per-expert w1/w3/w2 tensors (our names)."""
    out = {}
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")].replace(".mlp.", ".block_sparse_moe.")
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w1.weight"], out[f"{prefix}{e}.w3.weight"] = t[e, :half], t[e, half:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")].replace(".mlp.", ".block_sparse_moe.")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = t[e]
        elif ".mlp.gate.weight" in name and "block_sparse_moe" not in name and "experts" not in name:
            out[name] = t  # Qwen names stay; Mixtral routers are renamed below
        else:
            out[name] = t
    if any(".block_sparse_moe." in n for n in out):
        out = {n.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight"): t for n, t in out.items()}
    return out


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], stats: bool) -> dict[str, str]:
    theirs = unfuse(theirs)
    routers = [n for n in ours if n.endswith((".gate.weight", "shared_expert_gate.weight"))]
    row = {"names": "same" if set(ours) == set(theirs) else
           f"ours only {sorted(set(ours) - set(theirs))[:2]}, theirs only {sorted(set(theirs) - set(ours))[:2]}"}
    common = [n for n in ours if n in theirs and n not in routers]
    experts = [n for n in common if ".experts." in n or "shared_expert." in n]
    rest = [n for n in common if n not in experts]
    row["non-expert tensors equal"] = f"{sum(torch.equal(ours[n], theirs[n]) for n in rest)}/{len(rest)}"
    if stats:
        same = [n for n in experts if torch.equal(ours[n], theirs[n])]
        gaps = [float((ours[n].float() - theirs[n].float()).std()) for n in experts if n not in same]
        noise = f"; the rest differ by two independent noises: std {min(gaps):.4f}-{max(gaps):.4f}" if gaps else ""
        row["experts"] = f"{len(same)}/{len(experts)} equal{noise}"
        shapes = "same" if all(ours[n].shape == theirs[n].shape for n in routers) else "differ"
        row["routers"] = f"random (shapes {shapes})"
    else:
        row["experts"] = f"{sum(torch.equal(ours[n], theirs[n]) for n in experts)}/{len(experts)} equal"
        gaps = [float((ours[n].float() - theirs[n].float()).abs().max()) for n in routers if n in theirs]
        cos = [float(torch.nn.functional.cosine_similarity(ours[n].float(), theirs[n].float(), dim=-1).min())
               for n in routers if n in theirs]
        row["routers"] = f"max abs diff {max(gaps):.1e}, min cosine {min(cos):.5f}" if gaps else "missing"
    return row


def logits_gap(ours: Path, theirs: Path) -> str:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()(IDS).logits
        b = AutoModelForCausalLM.from_pretrained(theirs, dtype=torch.float32).eval()(IDS).logits
    return f"{float((a - b).abs().max()):.1e} (logit range {float(a.abs().max()):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    ap.add_argument("--keep", action="store_true", help="keep the outputs under --workdir")
    args = ap.parse_args()
    if not args.mergekit.exists():
        print(f"{args.mergekit} not found; set up .venv-mergekit (benchmarks/README.md)", file=sys.stderr)
        return 2
    models = build_models(args.workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    ours_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    rows = []
    for path in sorted(CONFIGS.glob("*.yml")):
        text = path.read_text().replace("MODELS/", f"{models}/")
        stats = "# parity: stats" in text
        case = args.workdir / path.stem
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir(parents=True)
        (case / "moe.yml").write_text(text)
        mk_ok, mk_s, mk_tail = run([str(args.mergekit), str(case / "moe.yml"), str(case / "theirs"), "--device", "cpu"],
                                   case / "mergekit.log", env)
        ev_ok, ev_s, ev_tail = run([sys.executable, "-m", "evomerge.cli", "moe", str(case / "moe.yml"),
                                    str(case / "ours"), "--device", "cpu"], case / "evomerge.log", ours_env)
        row = {"config": path.stem, "mergekit": f"{'ok' if mk_ok else 'FAIL'} {mk_s:.1f}s",
               "evomerge": f"{'ok' if ev_ok else 'FAIL'} {ev_s:.1f}s"}
        if mk_ok and ev_ok:
            row.update(compare(tensors(case / "ours"), tensors(case / "theirs"), stats))
            row["logits max abs diff"] = "random routers" if stats else logits_gap(case / "ours", case / "theirs")
        else:
            row["error"] = mk_tail if not mk_ok else ev_tail
        rows.append(row)
        print(row, flush=True)
        if not args.keep:
            shutil.rmtree(case / "ours", ignore_errors=True)
            shutil.rmtree(case / "theirs", ignore_errors=True)
    write_report(rows, args.report, args.mergekit)
    return 0


def write_report(rows: list[dict[str, str]], path: Path, mergekit: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    py = mergekit.parent / "python"
    version = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True).stdout.strip() or "?"
    lines = [
        "# `evomerge moe` beside `mergekit-moe`",
        "",
        f"Generated by `benchmarks/moe_parity.py` on {time.strftime('%Y-%m-%d')}: mergekit {version} "
        "(own venv, CPU) and evomerge on the configs in `benchmarks/mergekit_recipes/moe/`, tiny Llama "
        "models (4 layers, hidden 128, base + 3 fine-tunes, char-level tokenizer). Routers are computed "
        "in bfloat16 by both. mergekit's fused Mixtral experts are split per expert before comparing.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    lines += ["", "Routers of the hidden modes differ in the last bfloat16 bits: mergekit averages the states in "
              "bfloat16, we in float32 (docs/moe.md). Random routers and expert noise are drawn from our "
              "seeded generators and mergekit's global RNG, so only their sizes compare."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
