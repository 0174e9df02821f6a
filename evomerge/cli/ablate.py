"""``evomerge ablate GRID.yaml``: score a grid of fixed recipes and their parents as one table."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evomerge.cli.common import add_command, add_limit_option, add_var_option, built_zoo, print_report
from evomerge.devices import DEVICE_HELP, device_arg
from evomerge.errors import EXIT_FAILED

DEFAULT_OUT = Path("results/ablations")


def cmd_ablate(args: argparse.Namespace) -> int:
    from evomerge.ablate import load_grid, run_grid, validate_grid

    grid = load_grid(args.grid, _variables(args))
    if args.limit is not None:
        grid = grid.with_limit(args.limit)
    report = validate_grid(grid, config_only=args.validate_only, check_tasks=not args.no_task_check,
                           allow_pickle=args.allow_pickle)
    if print_report(args.grid, report):
        return 1
    if args.validate_only:
        how = "bundled configs" if grid.model_configs else "model headers"
        print(f"{args.grid}: ok ({len(grid.recipes)} recipes, {len(grid.rows())} rows; "
              f"checked against {how})")
        return 0
    out = Path(args.out) if args.out else DEFAULT_OUT / grid.name
    run = run_grid(grid, out, device=args.device, allow_pickle=args.allow_pickle,
                   log=lambda text: print(text, file=sys.stderr))
    if run.files:
        print(Path(run.files["md"]).read_text())
        print(f"table: {', '.join(str(p) for p in run.files.values())}")
    print(f"{len(run.evaluated)} row(s) scored, {len(run.skipped)} reused, {len(run.failed)} failed")
    if run.failed:
        print(f"evomerge: rows {sorted(run.failed)} failed (see above); fix them and re-run the "
              "same command: finished rows are kept", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _variables(args: argparse.Namespace) -> dict[str, str]:
    """``--var`` values, plus ``ZOO`` (the default zoo, built if missing) when the grid uses
    ``${ZOO}`` and neither ``--var`` nor the environment sets it."""
    from evomerge.ablate import grid_variables

    variables = dict(args.var)
    path = Path(args.grid)
    if path.is_file() and "ZOO" in grid_variables(path) and "ZOO" not in variables \
            and "ZOO" not in os.environ:
        variables["ZOO"] = zoo_variable(args.zoo)
    return variables


def zoo_variable(variant: str = "demo") -> str:
    """The default ``${ZOO}``: the zoo of ``variant`` in its default folder, built if missing."""
    return str(built_zoo(variant))


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "ablate", cmd_ablate,
                    help="score a grid of fixed recipes and their parents as one table",
                    description="Score every parent and recipe of a grid YAML on its eval sets and "
                                "write table.csv/.md/.png; re-running resumes where it stopped.")
    p.add_argument("grid", help="grid YAML (see ablations/)")
    p.add_argument("--out", help=f"output folder (default: {DEFAULT_OUT}/<grid name>)")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    add_limit_option(p, "docs per task for every eval set (a float < 1: a fraction)")
    add_var_option(p, "grid")
    p.add_argument("--zoo", default="demo", choices=("demo", "fixture"),
                   help="zoo variant used for ${ZOO} when it is not given (default: demo)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept models that ship only pickle (.bin) weights (they can run code: trust them)")
    p.add_argument("--validate-only", action="store_true",
                   help="check every recipe (models from model_configs: config.json only, no weights) "
                        "and eval set, then stop")
    p.add_argument("--no-task-check", action="store_true",
                   help="skip checking task names against lm-eval's index (saves ~15 s)")
