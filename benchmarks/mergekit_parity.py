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
4. Recipes marked ``# compare: vocab`` and/or ``# compare: template`` run on a second set of tiny
   checkpoints with tokenizers (different vocabularies and chat templates; ``VOCAB/`` in a
   template). mergekit then copies the tokenizer as ``mergekit-yaml`` does by default, and both
   outputs' tokenizers are compared too: the vocabulary (token -> id), ``config.vocab_size``, the ids
   of a sample text, the raw chat template and the text it renders for a fixed conversation.
   Where only the ids of a vocabulary differ (same tokens), embedding/head rows are compared by
   token.
5. Writes ``results/benchmarks/merge_parity.md``.

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
MODEL_VERSION = "v3"  # bump when the tiny models change
VOCAB_VERSION = "v1"  # bump when the tokenizer models change
VLM_VERSION = "v2"  # bump when the multi-module models change


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
        model.to(torch.float16).save_pretrained(models / f"fp16_{name}")
        model.to(torch.float32)
    # a LoRA adapter of the base (r 8 on q/v/down_proj, seeded A and B)
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import make_lora_adapter, make_tiny_llama

    make_lora_adapter(models / "lora_ft1", models / "base", seed=7, r=8, alpha=16)
    # one layer and a 8192 x 160 embedding (1.31M entries, past arcee_fusion's 1M sampling limit)
    wide = {"num_layers": 1, "hidden": 160, "heads": 4, "vocab": 8192, "intermediate": 256}
    make_tiny_llama(models / "wide_base", 11, **wide)
    make_tiny_llama(models / "wide_ft", 12, perturb_from=models / "wide_base", scale=0.01)
    (models / "DONE").write_text("ok\n")
    return models


# Our own short ChatML-style template (the inputs' second template, for chat_template: auto)
CHATML_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_vocab_models(root: Path) -> Path:
    """Tiny Llamas with tokenizers (tests/fixtures.py builders) under ``root/vocab-<version>``.

    ``base``: 99 char tokens and the fixtures' chat template; ``ft``: base + noise, same tokenizer;
    ``special``: + added specials ``<|im_start|>``, ``<|im_end|>``; ``reordered``: characters in
    reverse order + a plain ``<think>`` and a special ``<|im_end|>``; ``ft_chatml`` and
    ``ft_chatml_nl``: like ``ft`` with CHATML_LIKE (the second with a trailing newline).
    ``special`` and ``reordered`` ship CHATML_LIKE too."""
    vocab = root / f"vocab-{VOCAB_VERSION}"
    if (vocab / "DONE").exists():
        return vocab
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import make_tiny_llama, make_vocab_variant
    from transformers import AutoTokenizer

    shutil.rmtree(vocab, ignore_errors=True)
    vocab.mkdir(parents=True)
    make_tiny_llama(vocab / "base", 0, num_layers=2, hidden=64, vocab=99)
    make_tiny_llama(vocab / "ft", 1, perturb_from=vocab / "base", scale=0.01)
    make_vocab_variant(vocab / "special", vocab / "base", 2, specials=("<|im_start|>", "<|im_end|>"))
    make_vocab_variant(vocab / "reordered", vocab / "base", 3, reverse=True, plain=("<think>",),
                       specials=("<|im_end|>",))
    make_tiny_llama(vocab / "ft_chatml", 4, perturb_from=vocab / "base", scale=0.01)
    make_tiny_llama(vocab / "ft_chatml_nl", 5, perturb_from=vocab / "base", scale=0.01)
    for name, template in (("special", CHATML_LIKE), ("reordered", CHATML_LIKE),
                           ("ft_chatml", CHATML_LIKE), ("ft_chatml_nl", CHATML_LIKE + "\n")):
        tok = AutoTokenizer.from_pretrained(vocab / name)
        tok.chat_template = template
        tok.save_pretrained(vocab / name)
    (vocab / "DONE").write_text("ok\n")
    return vocab


def build_vlm_models(root: Path) -> Path:
    """Tiny multi-module (vision-language) checkpoints (tests/fixtures_vlm.py) under
    ``root/vlm-<version>/<kind>/{base,ft1,ft2}``, fine-tunes = base + seeded noise; built once."""
    vlm = root / f"vlm-{VLM_VERSION}"
    if (vlm / "DONE").exists():
        return vlm
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_vlm import VLM_KINDS, make_tiny_vlm

    shutil.rmtree(vlm, ignore_errors=True)
    for kind in VLM_KINDS:
        make_tiny_vlm(vlm / kind / "base", kind, 0)
        for i in (1, 2):
            make_tiny_vlm(vlm / kind / f"ft{i}", kind, i, perturb_from=vlm / kind / "base")
    (vlm / "DONE").write_text("ok\n")
    return vlm


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


def run_mergekit(mergekit: Path, recipe: Path, out: Path, log: Path, copy_tokenizer: bool) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    flags = ([] if copy_tokenizer else ["--no-copy-tokenizer"]) + ["--lazy-unpickle"]
    if recipe.read_text().count("\n---") > 0:  # a multi-stage recipe: mergekit-multi beside mergekit-yaml
        multi = mergekit.parent / "mergekit-multi"
        return run_cmd([str(multi), str(recipe), "--intermediate-dir", f"{out}.stages", "--out-path",
                        str(out), "--no-lazy", *flags], log, env=mergekit_env())
    flags += ["--lora-merge-cache", str(out.parent / "lora-cache")]
    return run_cmd([str(mergekit), str(recipe), str(out), *flags], log, env=mergekit_env())


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
# --lora-merge-cache: mergekit needs a folder to merge base+adapter inputs into (as in its CLI)
opts = {copy: MergeOptions(copy_tokenizer=copy, lazy_unpickle=True, quiet=True,
                           lora_merge_cache=sys.argv[3]) for copy in (False, True)}
opts[False].apply_global_options()
for recipe, out, copy in jobs:  # same steps as mergekit-yaml RECIPE OUT [--no-copy-tokenizer] --lazy-unpickle
    t = time.perf_counter()
    try:
        src = open(recipe, encoding="utf-8").read()
        if len([d for d in yaml.safe_load_all(src) if d is not None]) > 1:
            # several documents: as mergekit-multi RECIPE -I OUT.stages --out-path OUT --no-lazy
            from mergekit.graph import Executor
            from mergekit.scripts.multimerge import load_config, make_tasks
            configs, deps = load_config(src, out + ".stages")
            tasks = make_tasks(configs, deps, opts[copy], out + ".stages", out, False)
            Executor(tasks, math_device="cpu", storage_device="cpu").execute(desc="stages")
        else:
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(src)), out, options=opts[copy],
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
for recipe, out, _ in jobs:  # same as: evomerge merge RECIPE OUT --device cpu --force
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


def run_batch(python: Path, driver: str, jobs: list[tuple[Path, Path, bool]], work: Path, tag: str,
              env: dict[str, str]) -> list[Run]:
    for _, out, _ in jobs:
        shutil.rmtree(out, ignore_errors=True)
    jobs_file, res_file = work / f"{tag}-jobs.json", work / f"{tag}-results.json"
    jobs_file.write_text(json.dumps([[str(r), str(o), c] for r, o, c in jobs]))
    res_file.unlink(missing_ok=True)
    run = run_cmd([str(python), "-c", driver, str(jobs_file), str(res_file), str(work / "lora-cache")],
                  work / f"{tag}.log",
                  env=env, timeout=3600)
    done = json.loads(res_file.read_text()) if res_file.exists() else []
    runs = [Run(d["ok"], d["seconds"], d.get("error", "")) for d in done]
    while len(runs) < len(jobs):  # the driver itself died
        runs.append(Run(False, 0.0, f"{tag} driver failed: {run.error}"))
    return runs


def dump_recipe(recipe: Path, dest: Path) -> str | None:
    """Our engine's dump of ``recipe`` (adds ``seed:``); returns an error text on failure."""
    try:
        from merge_engine.stages import load_stages, stages_yaml

        dest.write_text(stages_yaml(load_stages(recipe)))  # one document: load_recipe(p).to_yaml()
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
    equal_after_cast: int = 0  # dtype mismatches whose mergekit tensor, cast to our dtype, equals ours
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
            c.equal_after_cast += int(torch.equal(a, b.to(a.dtype)))
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


# ---------------------------------------------------------------- tokenizers and chat templates
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SAMPLE_TEXT = "<|im_start|>user Hi <think>ok</think><|im_end|> <new>!"
CONVERSATIONS = {  # rendered with add_generation_prompt=True
    "with system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
    "no system": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "2+2?"}],
}


@dataclass
class TokSide:
    """What one tool's output directory says about its tokenizer (read with this venv's transformers)."""

    vocab: dict[str, int] = field(default_factory=dict)
    vocab_size: int | None = None  # config.json
    ids: list[int] = field(default_factory=list)  # of SAMPLE_TEXT
    template: str | None = None
    template_file: str = "—"  # where the template is stored
    rendered: dict[str, str] = field(default_factory=dict)
    error: str = ""


def read_tokenizer_side(out: Path) -> TokSide:
    side = TokSide()
    side.vocab_size = json.loads((out / "config.json").read_text()).get("vocab_size")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
    except Exception as err:  # noqa: BLE001 - reported in the table
        side.error = f"tokenizer does not load: {type(err).__name__}: {err}"[:200]
        return side
    side.vocab = dict(tok.get_vocab())
    side.ids = list(tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"])
    side.template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if (out / "chat_template.jinja").is_file():
        side.template_file = "chat_template.jinja"
    elif "chat_template" in json.loads((out / "tokenizer_config.json").read_text()):
        side.template_file = "tokenizer_config.json"
    for name, conv in CONVERSATIONS.items():
        try:
            side.rendered[name] = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template may reject a conversation; compared as such
            side.rendered[name] = f"<raises {type(err).__name__}: {err}>"[:200]
    return side


@dataclass
class TokCompare:
    ours: TokSide
    theirs: TokSide

    @property
    def vocab(self) -> str:
        a, b = self.ours.vocab, self.theirs.vocab
        if self.ours.error or self.theirs.error:
            return "—"
        if a == b:
            return f"**same** ({len(a)} tokens)"
        if set(a) == set(b):
            moved = sorted(t for t in a if a[t] != b[t])
            return (f"same {len(a)} tokens, {len(moved)} ids differ: "
                    + ", ".join(f"`{t}` {a[t]} vs {b[t]}" for t in moved[:4]) + (" …" if len(moved) > 4 else ""))
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        return f"DIFFERENT: only ours {only_a[:4]}, only mergekit {only_b[:4]}"

    @property
    def template_same(self) -> bool:
        return self.ours.template == self.theirs.template

    @property
    def rendered_same(self) -> bool:
        return self.ours.rendered == self.theirs.rendered

    def first_render_diff(self) -> str:
        for name in CONVERSATIONS:
            a, b = self.ours.rendered.get(name, ""), self.theirs.rendered.get(name, "")
            if a != b:
                i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                return f"{name}: first difference at char {i}: ours {a[i:i + 24]!r} vs mergekit {b[i:i + 24]!r}"
        return ""


def align_vocab_rows(theirs: dict[str, torch.Tensor], their_vocab: dict[str, int],
                     our_vocab: dict[str, int]) -> bool:
    """Reorder mergekit's embedding/head rows into our ids when both vocabularies hold the same
    tokens under other ids (rows past the vocabulary, padding, stay). True when rows were moved."""
    if their_vocab == our_vocab or set(their_vocab) != set(our_vocab):
        return False
    order = sorted(our_vocab, key=our_vocab.get)
    src = torch.tensor([their_vocab[t] for t in order])
    dst = torch.tensor([our_vocab[t] for t in order])
    for name in VOCAB_TENSORS:
        if name in theirs and theirs[name].shape[0] > int(dst.max()):
            moved = theirs[name].clone()
            moved[dst] = theirs[name][src]
            theirs[name] = moved
    return True


# ---------------------------------------------------------------- one case
@dataclass
class Case:
    name: str
    method: str
    mode: str  # exact | stats
    note: str
    compare: tuple[str, ...] = ()  # extra comparisons: "vocab", "template"
    mk: Run | None = None
    ours: Run | None = None
    cmp: Compare | None = None
    stats: Stats | None = None
    dump: str = "not checked"
    dump_detail: str = ""
    diagnosis: str = ""
    tok: TokCompare | None = None
    rows_aligned: bool = False


def read_template(path: Path, models: Path, vocab: Path, vlm: Path) -> tuple[str, Case]:
    text = path.read_text()
    mode = (re.search(r"^# parity: (\w+)", text, re.M) or [None, "exact"])[1]
    note = (re.search(r"^# note: (.*)$", text, re.M) or [None, ""])[1]
    compare = (re.search(r"^# compare: (.*)$", text, re.M) or [None, ""])[1]
    method = re.search(r"^merge_method: (\S+)", text, re.M)[1]
    body = text.replace("MODELS/", str(models) + "/").replace("VOCAB/", str(vocab) + "/")
    body = body.replace("VLM/", str(vlm) + "/")
    extra = tuple(w.strip() for w in compare.split(",") if w.strip())
    return body, Case(path.stem, method, mode, note, extra)


def run_cases(templates: list[Path], models: Path, vocab: Path, vlm: Path, work: Path, mergekit: Path,
              evomerge: Path, dump_check: bool, keep: bool, cli: bool) -> list[Case]:
    """Write every recipe (and our dump of it), run each tool over all of them, then compare."""
    cases, dirs = [], []
    for path in templates:
        body, case = read_template(path, models, vocab, vlm)
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

    # mergekit copies the tokenizer (its CLI default) where the recipe compares tokenizers; we always do
    copy = [bool(c.compare) for c in cases]
    mk_jobs = [(d / "recipe.yml", d / "out-mergekit", c) for d, c in zip(dirs, copy)]
    dump_idx = [i for i, d in enumerate(dirs) if (d / "dumped.yml").exists()]
    mk_jobs += [(dirs[i] / "dumped.yml", dirs[i] / "out-mergekit-dumped", copy[i]) for i in dump_idx]
    ours_jobs = [(d / "recipe.yml", d / "out-evomerge", True) for d in dirs]
    if cli:
        mk_runs = [run_mergekit(mergekit, r, o, o.parent / f"{o.name}.log", c) for r, o, c in mk_jobs]
        ours_runs = [run_evomerge(evomerge, r, o, o.parent / f"{o.name}.log") for r, o, _ in ours_jobs]
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
            if case.compare:
                case.tok = TokCompare(read_tokenizer_side(cdir / "out-evomerge"),
                                      read_tokenizer_side(cdir / "out-mergekit"))
                case.rows_aligned = align_vocab_rows(theirs, case.tok.theirs.vocab, case.tok.ours.vocab)
            if case.mode == "stats":
                base_dir = re.search(r"^base_model: (\S+)", body, re.M)[1]
                case.stats = compare_stats(ours, theirs, load_tensors(Path(base_dir)))
            else:
                case.cmp = compare_exact(ours, theirs)
            case.diagnosis = diagnose(case, ours, theirs, cdir)
        if not keep:
            for sub in ("out-mergekit", "out-evomerge", "out-mergekit-dumped", "out-mergekit.stages",
                        "out-mergekit-dumped.stages"):
                shutil.rmtree(cdir / sub, ignore_errors=True)
        verdict = ("exact" if case.cmp and case.cmp.exact else
                   f"{case.cmp.equal}/{case.cmp.total} max {case.cmp.max_abs:.3g}" if case.cmp else
                   f"stats frac {case.stats.frac_ours:.4f}/{case.stats.frac_theirs:.4f}" if case.stats else
                   f"mk={fmt_run(case.mk)} ours={fmt_run(case.ours)}")
        if case.tok is not None:
            verdict += (f"; vocab {'same' if case.tok.ours.vocab == case.tok.theirs.vocab else 'differs'}"
                        f"; template {'same' if case.tok.template_same else 'differs'}")
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
                     f"{f' (+{len(c.dtype_mismatch) - 2} more)' if len(c.dtype_mismatch) > 2 else ''}; "
                     f"{c.equal_after_cast}/{len(c.dtype_mismatch)} equal once mergekit's is cast to ours")
    if case.tok is not None:  # which embedding/head rows differ, by token
        inv = {i: t for t, i in case.tok.ours.vocab.items()}
        for name in VOCAB_TENSORS:
            if name in ours and name in theirs and ours[name].shape == theirs[name].shape:
                rows = torch.nonzero((ours[name].double() - theirs[name].double()).abs().amax(-1)).flatten().tolist()
                if rows:
                    toks = [inv.get(r) for r in rows]
                    named = [repr(t) for t in toks if t is not None]
                    pad = [r for r, t in zip(rows, toks) if t is None]
                    parts.append(f"{name} rows differ: {', '.join(named[:6]) or 'no token rows'}"
                                 + (f"; padding rows {pad[0]}–{pad[-1]} ({len(pad)})" if pad else ""))
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
        "vocab 384), seeded; fine-tunes = base + seeded correlated noise; float32, bfloat16 and float16 "
        "sets, a LoRA adapter of the base (`lora_ft1`, r 8 on q/v/down_proj; mergekit merges it with "
        "`--lora-merge-cache`), and a one-layer pair with a 8192 x 160 embedding (`wide_*`). Recipes: `benchmarks/mergekit_recipes/` (`MODELS/` → the model directory). Each recipe "
        "is run by `mergekit-yaml RECIPE OUT --no-copy-tokenizer --lazy-unpickle` and by "
        "`evomerge merge RECIPE OUT --device cpu`, and every output tensor is compared (multi-stage "
        "recipes, several YAML documents, by mergekit-multi's own steps, as `mergekit-multi RECIPE "
        "-I OUT.stages --out-path OUT --no-lazy`; the method column is the final stage's). Tokenizer and "
        "chat-template recipes (`VOCAB/`, see their section below) use tiny Llamas with tokenizers "
        "(2 layers, hidden 64, 99-105 tokens) from `tests/fixtures.py`. Multi-module recipes (`VLM/`, "
        "`modules_*`, `models_vlm_*`) use tiny Qwen2-VL, Qwen2.5-VL, Mistral3 and Gemma3 vision-language "
        "models (4 text layers, 3 vision layers, hub tensor names; base + two seeded fine-tunes) from "
        "`tests/fixtures_vlm.py`.",
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
        aligned = ". Embedding/head rows compared by token (ids differ)" if c.rows_aligned else ""
        lines.append(f"| {c.name} | {c.method} | {verdict} | {el} | {m.max_abs:.3g} | {m.max_ulp} "
                     f"| {m.worst or '—'} | {fmt_run(c.mk)} / {fmt_run(c.ours)} | {c.note}{aligned}"
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
    lines += tokenizer_section(cases)
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


def tokenizer_section(cases: list[Case]) -> list[str]:
    """The report's table of tokenizer and chat-template comparisons (recipes with ``# compare:``)."""
    rows = [c for c in cases if c.compare]
    if not rows:
        return []
    lines = [
        "",
        "## Tokenizers and chat templates",
        "",
        "Recipes on the tokenizer models (`VOCAB/`: 99 char tokens; + added specials `<|im_start|>`, "
        "`<|im_end|>`; reversed order + a plain `<think>` and a special `<|im_end|>`; two more inputs "
        "with a ChatML-style template, one with a trailing newline). mergekit copies the tokenizer "
        "here (`mergekit-yaml` without `--no-copy-tokenizer`). Both outputs are read with "
        "transformers (this venv): vocabulary token → id, `config.json` `vocab_size`, the ids of "
        f"`{SAMPLE_TEXT}`, the raw chat template, and the text it renders "
        "(`apply_chat_template(..., add_generation_prompt=True)`) for a conversation with and one "
        "without a system message. Tensors are in the table above.",
        "",
        "| recipe | vocabulary (token → id) | vocab_size ours / mergekit | sample ids | chat template text "
        "| rendered conversations | template stored in (ours / mergekit) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        if c.tok is None:
            lines.append(f"| {c.name} | — | — | — | — | — | — | {c.note}. **not compared: a merge failed** |")
            continue
        t, notes = c.tok, [c.note]
        for who, side in (("ours", t.ours), ("mergekit", t.theirs)):
            if side.error:
                notes.append(f"**{who}: {side.error}**")
        check = "vocab" in c.compare
        vocab = t.vocab if check else ("same" if t.ours.vocab == t.theirs.vocab else "differs") + " (not the subject)"
        ids = "**same**" if t.ours.ids == t.theirs.ids else f"ours {t.ours.ids[:8]} vs mergekit {t.theirs.ids[:8]}"
        size = f"{t.ours.vocab_size} / {t.theirs.vocab_size}"
        if t.ours.vocab_size == t.theirs.vocab_size:
            size = f"**{size}**"
        tmpl = "**same**" if t.template_same else (
            "DIFFERENT" + (" (same after strip)" if (t.ours.template or "").strip() == (t.theirs.template or "").strip()
                           else ""))
        rendered = "**same**" if t.rendered_same else "DIFFERENT"
        if not t.rendered_same:
            notes.append(t.first_render_diff())
        lines.append(f"| {c.name} | {vocab} | {size} | {ids} | {tmpl} | {rendered} | "
                     f"{t.ours.template_file} / {t.theirs.template_file} | {'. '.join(n for n in notes if n)} |")
    return lines


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
    models, vocab, vlm = build_models(args.workdir), build_vocab_models(args.workdir), build_vlm_models(args.workdir)
    templates = sorted(RECIPES.glob("*.yml"))
    if args.only:
        wanted = set(args.only.split(","))
        templates = [t for t in templates if t.stem in wanted]
    cases = run_cases(templates, models, vocab, vlm, args.workdir, args.mergekit, args.evomerge,
                      not args.no_dump_check, args.keep, args.cli)
    if args.only and args.report == DEFAULT_REPORT:
        print("(--only given: report not written)")
        return 0
    write_report(cases, args.report, args, mergekit_versions(args.mergekit))
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
