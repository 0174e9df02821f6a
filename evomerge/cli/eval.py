"""``evomerge eval MODEL``: score a saved model on lm-eval tasks.

    evomerge eval out/merged --tasks smoke_mc,smoke_gen:2 --limit 10 --out results.json
    evomerge eval out/merged --preset medical --backend vllm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from evomerge.cli.common import add_command, add_limit_option, whole_number
from evomerge.errors import EXIT_FAILED
from evomerge.devices import DEVICE_HELP, device_arg
from merge_engine.dtypes import MODEL_DTYPE_NAMES


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``sub``; returns its parser."""
    p = add_command(sub, "eval", cmd_eval, help="score a saved model on lm-eval tasks",
                    description="Score a model directory or hub model on lm-eval tasks; prints a table.")
    p.add_argument("model", help="a model directory (config.json, weights, tokenizer) or a hub id "
                   "ORG/NAME[@REVISION] (the hub cache, else a download)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tasks", help="comma-separated tasks, each NAME or NAME:WEIGHT")
    src.add_argument("--preset", help="a preset under eval_tasks/presets/ (e.g. medical)")
    p.add_argument("--backend", choices=["hf", "vllm"], default=None, help="default: hf")
    add_limit_option(p, "docs per task: an int N (seeded random subset) or a fraction < 1")
    p.add_argument("--seed", type=whole_number(0), default=None, help="seed of the doc subset (default 0)")
    p.add_argument("--batch-size", type=whole_number(1), default=None)
    p.add_argument("--dtype", choices=["auto", *MODEL_DTYPE_NAMES], default=None)
    p.add_argument("--num-fewshot", type=whole_number(0), default=None, help="override every task's few-shot count")
    p.add_argument("--apply-chat-template", action="store_true", default=None)
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="extra folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--allow-task-code", action="store_true",
                   help="run Python code that local task YAMLs name with !function (trusted folders only)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a model that ships only pickle (.bin) weights (pickle can run code)")
    p.add_argument("--validate-only", action="store_true",
                   help="check the tasks and metrics, load no model")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``evomerge eval``; 0 on success, 2 on a config problem (message on stderr)."""
    from evomerge.evaluate.api import evaluate_model_dir
    from evomerge.evaluate import EvalConfigError
    from evomerge.evaluate.result import format_table
    from evomerge.evaluate import validate_eval_config
    from merge_engine.errors import MergeError  # a model that cannot be found (path or hub id)

    try:
        cfg = config_from_args(args)
        if args.validate_only:
            problems = validate_eval_config(cfg)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            print(f"eval config: {'ok' if not problems else f'{len(problems)} problem(s)'}")
            return 0 if not problems else EXIT_FAILED  # like `validate`: problems found
        result = evaluate_model_dir(args.model, cfg, device=args.device, out_json=args.out,
                                    allow_pickle=args.allow_pickle)
    except (EvalConfigError, FileNotFoundError, MergeError) as err:
        print(f"evomerge eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`EvalConfig` the flags describe (preset fields, then explicit flags)."""
    from evomerge.evaluate.tasks.config import build_eval_config

    return build_eval_config(
        tasks=args.tasks, preset=args.preset, include_paths=args.include_path,
        num_fewshot=args.num_fewshot, backend=args.backend, limit=args.limit, seed=args.seed,
        batch_size=args.batch_size, dtype=args.dtype, apply_chat_template=args.apply_chat_template,
        allow_task_code=args.allow_task_code or None)  # flags left out keep the preset's values
