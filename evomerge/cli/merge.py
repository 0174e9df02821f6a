"""``evomerge merge RECIPE OUT`` and ``evomerge validate RECIPE``: the merge engine's commands."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from evomerge.cli.common import add_command, add_var_option, parse_size, print_report, warn
from evomerge.devices import DEVICE_HELP, device_arg
from evomerge.errors import EvomergeError
from merge_engine.dtypes import DTYPE_NAMES
from merge_engine.io import DEFAULT_SHARD_SIZE  # a constant: keeps the CLI free of torch


def cmd_merge(args: argparse.Namespace) -> int:
    from merge_engine.merge import run_merge
    from merge_engine.stages import load_stages

    stages = load_stages(args.recipe, variables=dict(args.var))
    show = not args.dry_run and (sys.stderr.isatty() or bool(os.environ.get("EVOMERGE_PROGRESS")))
    with contextlib.ExitStack() as stack:
        bar = None
        if show:
            from tqdm import tqdm
            bar = stack.enter_context(tqdm(total=0, unit="tensor", desc="merging", leave=False))

        def progress(done: int, total: int, stage: str | None = None) -> None:
            if bar is not None:
                if stage is not None and bar.desc != f"merging {stage}":
                    bar.set_description(f"merging {stage}")
                    bar.reset(total)
                bar.total = total
                bar.update(done - bar.n)

        if len(stages) > 1:
            return _merge_stages(args, stages, lambda stage, done, total: progress(done, total, stage))
        result = run_merge(stages[0].recipe, args.out, device=args.device, shard_size=args.shard_size,
                           allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                           force=args.force, dry_run=args.dry_run, progress=progress,
                           lora_merge_dtype=args.lora_merge_dtype)
    warn(result.warnings)
    if args.dry_run:
        print(f"{args.recipe}: valid; would write {result.tensors} tensors to {args.out}")
    else:
        print(f"merged {result.tensors} tensors into {result.out_dir} in {result.seconds:.2f}s")
    return 0


def _merge_stages(args: argparse.Namespace, stages: list, progress) -> int:
    """``evomerge merge`` of a multi-stage recipe: every stage, the final one into OUT."""
    from merge_engine.errors import RecipeError
    from merge_engine.multistage import run_stages
    from merge_engine.stage_validate import validate_stages

    if args.dry_run:  # problems end the command as a one-stage recipe's do (RecipeError)
        report = validate_stages(stages, allow_pickle=args.allow_pickle,
                                 trust_remote_code=args.trust_remote_code, lora_merge_dtype=args.lora_merge_dtype)
        if report.problems:
            raise RecipeError(report.problems)
        warn(report.warnings)
        print(f"{args.recipe}: valid; would merge {len(stages)} stages into {args.out}")
        return 0
    result = run_stages(stages, args.out, device=args.device, memory_budget=args.stage_memory,
                        keep_dir=args.intermediate_dir, force=args.force, shard_size=args.shard_size,
                        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                        progress=progress, lora_merge_dtype=args.lora_merge_dtype)
    warn(result.warnings)
    print(f"merged {len(stages)} stages ({result.tensors} tensors in the final one) into "
          f"{result.out_dir} in {result.seconds:.2f}s")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from merge_engine.errors import RecipeError
    from merge_engine.stage_validate import validate_stages
    from merge_engine.session import validate
    from merge_engine.stages import load_stages, stage_count
    from merge_engine.validate import Report

    configs = _model_configs(args.model_config) if args.model_config else None
    with_models = not args.no_models or configs is not None
    options = dict(model_configs=configs, allow_pickle=args.allow_pickle,
                   trust_remote_code=args.trust_remote_code)
    try:
        several = stage_count(args.recipe) > 1
    except RecipeError:
        several = False  # validate() reports it
    if several:
        try:
            report = validate_stages(load_stages(args.recipe, dict(args.var)), with_models=with_models, **options)
        except RecipeError as err:
            report = Report(problems=list(err.problems))
    else:
        report = validate(args.recipe, variables=dict(args.var), with_models=with_models, **options)
    code = print_report(args.recipe, report)
    if code == 0:
        print(f"{args.recipe}: ok")
    return code


def _model_configs(items: list[str]) -> dict[str, str]:
    """``--model-config org/name=DIR`` options as ``{org/name: DIR}``."""
    configs = {}
    for item in items:
        ref, sep, folder = item.partition("=")
        if not sep or not ref or not folder:
            raise EvomergeError(f"--model-config {item!r} must look like org/name=DIR")
        configs[ref] = folder
    return configs


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "merge", cmd_merge, help="merge models as a recipe YAML says")
    p.add_argument("recipe", help="mergekit-compatible recipe YAML")
    p.add_argument("out", help="output model directory")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                   help="max shard size, e.g. 5G (default)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickle .bin checkpoints")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--dry-run", action="store_true", help="validate and plan only; write nothing")
    p.add_argument("--lora-merge-dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype base+adapter models (and stage+adapter) are merged in and read as "
                        "(mergekit's option; default: the base's dtypes)")
    p.add_argument("--intermediate-dir", metavar="DIR", default=None,
                   help="multi-stage recipes: also write each named stage to DIR/NAME, reusing a "
                        "folder there that holds the same stage's merge (default: intermediates stay "
                        "in memory and are not kept)")
    p.add_argument("--stage-memory", type=parse_size, default=None, metavar="SIZE",
                   help="multi-stage recipes: memory for intermediate stages, e.g. 40G (default: half "
                        "the available memory); stages beyond it go to a temporary folder beside OUT")
    add_var_option(p, "recipe")

    p = add_command(sub, "validate", cmd_validate, help="check a recipe and its models; lists every problem")
    p.add_argument("recipe")
    p.add_argument("--no-models", action="store_true", help="check the recipe only, not the model files")
    p.add_argument("--model-config", action="append", default=[], metavar="REPO=DIR",
                   help="validate model REPO from DIR/config.json alone (no weights needed); repeatable")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    add_var_option(p, "recipe")
