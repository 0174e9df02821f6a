"""``evomerge ablate GRID.yaml``: score a grid of fixed recipes and their parents as one table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evomerge.cli.common import add_command, add_limit_option, add_var_option, built_zoo, print_report
from evomerge.devices import DEVICE_HELP, device_arg
from evomerge.errors import EXIT_FAILED


def cmd_ablate(args: argparse.Namespace) -> int:
    from evomerge.ablate import ablate

    done = ablate(args.grid, args.out, variables=dict(args.var),
                  default_variables={"ZOO": lambda: zoo_variable(args.zoo)}, limit=args.limit,
                  device=args.device, allow_pickle=args.allow_pickle,
                  validate_only=args.validate_only, check_tasks=not args.no_task_check,
                  log=lambda text: print(text, file=sys.stderr))
    if print_report(args.grid, done.report):
        return 1
    grid, run = done.grid, done.run
    if run is None:  # --validate-only
        how = "bundled configs" if grid.model_configs else "model headers"
        print(f"{args.grid}: ok ({len(grid.recipes)} recipes, {len(grid.rows())} rows; "
              f"checked against {how})")
        return 0
    if run.files:
        print(Path(run.files["md"]).read_text())
        print(f"table: {', '.join(str(p) for p in run.files.values())}")
    print(f"{len(run.evaluated)} row(s) scored, {len(run.skipped)} reused, {len(run.failed)} failed")
    if run.failed:
        print(f"evomerge: rows {sorted(run.failed)} failed (see above); fix them and re-run the "
              "same command: finished rows are kept", file=sys.stderr)
        return EXIT_FAILED
    return 0


def zoo_variable(variant: str = "demo") -> str:
    """The default ``${ZOO}``: the zoo of ``variant`` in its default folder, built if missing."""
    return str(built_zoo(variant))


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "ablate", cmd_ablate,
                    help="score a grid of fixed recipes and their parents as one table",
                    description="Score every parent and recipe of a grid YAML on its eval sets and "
                                "write table.csv/.md/.png; re-running resumes where it stopped.")
    p.add_argument("grid", help="grid YAML (see ablations/)")
    p.add_argument("--out", help="output folder (default: results/ablations/<grid name>)")
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
