"""``evomerge moe CONFIG OUT``: build a mixture-of-experts model from dense experts
(mergekit-moe's config file, unchanged; see docs/moe.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from evomerge.cli.common import add_command, add_var_option, parse_size, warn
from evomerge.devices import DEVICE_HELP, device_arg
from merge_engine.dtypes import DTYPE_NAMES
from merge_engine.io import DEFAULT_SHARD_SIZE  # a constant: keeps the CLI free of torch


def cmd_moe(args: argparse.Namespace) -> int:
    from merge_engine.moe import build_moe, load_moe_config

    config = load_moe_config(args.config, variables=dict(args.var))
    show = not args.dry_run and (sys.stderr.isatty() or bool(os.environ.get("EVOMERGE_PROGRESS")))
    with contextlib.ExitStack() as stack:
        bar = None
        if show:
            from tqdm import tqdm
            bar = stack.enter_context(tqdm(total=0, unit="tensor", desc="building", leave=False))

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        result = build_moe(config, args.out, device=args.device, router_dtype=args.router_dtype, seed=args.seed,
                           shard_size=args.shard_size, allow_same_experts=args.allow_same_experts,
                           allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                           force=args.force, dry_run=args.dry_run, progress=progress)
    warn(result.warnings)
    if args.dry_run:
        print(f"{args.config}: valid; would write a {result.architecture} model of {result.tensors} tensors "
              f"to {args.out}")
    else:
        print(f"built a {result.architecture} model of {result.tensors} tensors in {result.out_dir} "
              f"in {result.seconds:.2f}s")
    return 0


def is_moe_space_file(path: str) -> bool:
    """Whether the search space file at ``path`` has a ``moe:`` block (an unreadable file: False,
    and the plain space loader reports why)."""
    import yaml

    from evomerge.moe.search_space import is_moe_space
    from evomerge.space.load import read_space_text

    try:
        return is_moe_space(yaml.safe_load(read_space_text(Path(path))))
    except Exception:  # noqa: BLE001  the space loader gives the one-line error
        return False


def cmd_moe_search(args: argparse.Namespace) -> int:
    """``evomerge search SPACE`` for a space with a ``moe:`` block (same options)."""
    import optuna

    from evomerge.cli.common import ProgressLine, library_output_hidden, quiet_libraries
    from evomerge.moe.run import run_moe_search
    from evomerge.moe.search_space import load_moe_space, moe_space_distributions
    from evomerge.results import report_table
    from evomerge.cli.search import run_options
    from evomerge.search.run import quiet_optuna
    from evomerge.search.study import redact

    quiet_libraries()
    space = load_moe_space(args.space, variables=dict(args.var))
    options = run_options(args, space.name)
    line = ProgressLine(sys.stderr)
    print(f"MoE search {space.name}: {len(moe_space_distributions(space))} genes, output {options.out_dir}",
          file=sys.stderr)
    with quiet_optuna(), library_output_hidden(args.verbose):
        summary = run_moe_search(space, options, progress=line, log=line.log)
    line.finish()
    print(report_table(optuna.load_study(study_name=summary.study_name, storage=summary.storage), k=1))
    print(f"{summary.finished} finished trials; results in {summary.out_dir}/ (best/*.moe.yml, trials.csv); "
          f"study {summary.study_name} in {redact(summary.storage)}")
    if summary.stopped:
        print(f"stopped early: {summary.stopped}", file=sys.stderr)
    return 1 if summary.stopped and summary.finished == 0 else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "moe", cmd_moe, help="build a mixture-of-experts model from dense experts "
                                              "(mergekit-moe config)")
    p.add_argument("config", help="mergekit-moe config YAML (base_model, experts, gate_mode, ...)")
    p.add_argument("out", help="output model directory")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="where the base model computes the prompts' hidden states; " + DEVICE_HELP)
    p.add_argument("--router-dtype", choices=DTYPE_NAMES, default="bfloat16",
                   help="dtype of that computation (bfloat16, as mergekit-moe)")
    p.add_argument("--seed", type=int, default=0, help="seed of random routers and expert noise (default 0)")
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                   help="max shard size, e.g. 5G (default)")
    p.add_argument("--allow-same-experts", action="store_true",
                   help="allow every expert to be the same model (useful only before training)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickle .bin checkpoints")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--dry-run", action="store_true", help="check the config and models only; write nothing")
    add_var_option(p, "config")
