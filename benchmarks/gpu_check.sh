#!/usr/bin/env bash
# GPU placement check: one line per check (PASS/FAIL/SKIP + numbers); exits 1 if any FAIL.
#
#   benchmarks/gpu_check.sh [WORKDIR]        # PYTHON=... to choose the interpreter
#
# On a machine with CUDA (a few minutes on one GPU; the demo zoo is built first if not cached,
# no downloads): a merge on cuda against the same merge on the cpu, run-to-run bytes on cuda,
# in-memory apply on cuda against the disk merge, in-memory apply into a model with a layer
# offloaded to the CPU (accelerate) against the disk merge loaded the same way, and a 4-trial in-memory search of the demo
# space with each backend (hf, and vllm when installed) on cuda against the same search on the
# cpu. Without CUDA every check prints SKIP and the script exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

exec "$PYTHON" - "${1:-}" <<'EOF'
import hashlib, importlib.util, sys, time
from pathlib import Path

import torch

CHECKS = ["merge cuda vs cpu", "merge cuda run-to-run bytes", "in-memory apply on cuda vs disk",
          "in-memory apply cuda+cpu offload vs disk", "search hf cuda vs cpu", "search vllm cuda vs hf cpu"]
if not torch.cuda.is_available():
    for name in CHECKS:
        print(f"SKIP {name}: no CUDA device (torch {torch.__version__})")
    sys.exit(0)

from transformers import AutoModelForCausalLM

from evomerge.cli.common import built_zoo
from evomerge.search.run import RunOptions, run_search
from evomerge.space import load_space
from merge_engine.apply import InMemoryMerger
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe

import tempfile
# a fresh folder every run (a reused one would resume the last run's studies)
work = Path(tempfile.mkdtemp(prefix="evomerge-gpu-check-", dir=sys.argv[1] or None))
failed = False


def report(ok: bool, name: str, numbers: str) -> None:
    global failed
    failed |= not ok
    print(f"{'PASS' if ok else 'FAIL'} {name}: {numbers}", flush=True)


def state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def sha(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


zoo = built_zoo("demo")
recipe = parse_recipe({"merge_method": "ties", "base_model": str(zoo / "base"), "seed": 3,
                       "parameters": {"normalize": True},
                       "models": [{"model": str(zoo / m), "parameters": {"weight": 0.4, "density": 0.6}}
                                  for m in ("add_expert", "sort_expert", "shift_expert")]})
timings = {}
for name, device in (("cpu", "cpu"), ("cuda", "cuda:0"), ("cuda2", "cuda:0")):
    start = time.perf_counter()
    run_merge(recipe, work / f"merge_{name}", device=device, force=True)
    timings[name] = time.perf_counter() - start
cpu, gpu = state(work / "merge_cpu"), state(work / "merge_cuda")
same = sum(torch.equal(cpu[k], gpu[k]) for k in cpu)
worst = max((cpu[k].float() - gpu[k].float()).abs().max().item() for k in cpu)
report(worst <= 1e-5, "merge cuda vs cpu", f"{same}/{len(cpu)} tensors bit-identical, max |diff| {worst:.2e}, "
       f"cpu {timings['cpu']:.1f}s cuda {timings['cuda']:.1f}s")
report(sha(work / "merge_cuda") == sha(work / "merge_cuda2"), "merge cuda run-to-run bytes",
       f"sha256 {sha(work / 'merge_cuda')[:12]} vs {sha(work / 'merge_cuda2')[:12]}")

model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).to("cuda:0")
with InMemoryMerger(model, device="cuda:0") as merger:
    start = time.perf_counter()
    merger.apply(recipe)
    seconds = time.perf_counter() - start
    home = merger.source_home
mem = {k: v.detach().cpu() for k, v in model.state_dict().items()}
disk = AutoModelForCausalLM.from_pretrained(work / "merge_cuda", dtype=torch.float32).state_dict()
equal = sum(torch.equal(mem[k], disk[k]) for k in disk)
report(equal == len(disk), "in-memory apply on cuda vs disk",
       f"{equal}/{len(disk)} tensors bit-identical, sources {home}, apply {seconds:.2f}s")
del model, mem, disk
torch.cuda.empty_cache()

# layer 1 offloaded to the CPU: the merge must reach accelerate's CPU store (evomerge.offload)
from transformers import AutoTokenizer

from evomerge.candidate import Candidate

split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0,
         "model.rotary_emb": 0, "lm_head": 0}
ids = torch.arange(3, 40).reshape(1, -1).to("cuda:0")
cand = Candidate(AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32, device_map=split),
                 AutoTokenizer.from_pretrained(zoo / "base"), device="cuda:0")
cand.apply(recipe)
with torch.no_grad():
    mem = cand.model(ids).logits
    disk = AutoModelForCausalLM.from_pretrained(work / "merge_cuda", dtype=torch.float32, device_map=split)(ids).logits
cand.close()
gap = (mem - disk).abs().max().item()
report(gap == 0.0, "in-memory apply cuda+cpu offload vs disk", f"max |logit diff| {gap:.2e}")
del cand, mem, disk
torch.cuda.empty_cache()


def search(device: str, backend: str) -> list[float]:
    import optuna
    space = load_space("search_spaces/zoo_demo.yaml", variables={"ZOO": str(zoo)})
    space = space.model_copy(update={"report_eval": None, "pruning": None, "top_k": 1,
                                     "eval": space.eval.model_copy(update={"backend": backend, "limit": 50})})
    out = work / f"search_{backend}_{device.replace(':', '')}"
    summary = run_search(space, RunOptions(out_dir=out, trials=4, device=device))
    study = optuna.load_study(study_name=summary.study_name, storage=summary.storage)
    return [t.values[0] for t in study.trials if t.values]


start = time.perf_counter()
cpu_scores = search("cpu", "hf")
cpu_s = time.perf_counter() - start
start = time.perf_counter()
gpu_scores = search("cuda:0", "hf")
gpu_s = time.perf_counter() - start
gap = abs(cpu_scores[0] - gpu_scores[0])
report(gap <= 0.02 and len(gpu_scores) == 4, "search hf cuda vs cpu",
       f"trial 0 score cpu {cpu_scores[0]:.4f} cuda {gpu_scores[0]:.4f} (|diff| {gap:.4f}); "
       f"{len(gpu_scores)} trials, cpu {cpu_s:.0f}s cuda {gpu_s:.0f}s")

if importlib.util.find_spec("vllm") is None:
    print("SKIP search vllm cuda vs hf cpu: vllm is not installed (pip install 'evomerge[vllm]')")
else:
    start = time.perf_counter()
    vllm_scores = search("cuda:0", "vllm")
    gap = abs(cpu_scores[0] - vllm_scores[0])
    report(gap <= 0.02 and len(vllm_scores) == 4, "search vllm cuda vs hf cpu",
           f"trial 0 score hf cpu {cpu_scores[0]:.4f} vllm cuda {vllm_scores[0]:.4f} (|diff| {gap:.4f}); "
           f"{len(vllm_scores)} trials in {time.perf_counter() - start:.0f}s")
sys.exit(1 if failed else 0)
EOF
