"""``evomerge ablate GRID.yaml``: score a grid of fixed recipes and their parents as one table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from evomerge.errors import EvomergeError

DEFAULT_OUT = Path("results/ablations")


def _var(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit takes a number of docs (or a fraction < 1), got {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def zoo_variable(variant: str = "demo") -> str:
    """The default ``${ZOO}``: the zoo of ``variant`` in its default folder, built if missing."""
    try:
        from evomerge.zoo import build_zoo, default_zoo_dir
    except ImportError:
        raise EvomergeError("${ZOO} is not set and the model zoo is not installed; "
                            "pass --var ZOO=DIR (a folder of zoo models)") from None
    folder = Path(default_zoo_dir(variant))
    # Returns at once when the folder holds this variant's build; builds it (minutes) otherwise.
    build_zoo(folder, variant=variant, log=lambda text: print(text, file=sys.stderr))
    return str(folder)


def _variables(args: argparse.Namespace) -> dict[str, str]:
    import os

    from evomerge.ablate import grid_variables

    variables = dict(args.var or [])
    path = Path(args.grid)
    if path.is_file() and "ZOO" in grid_variables(path) and "ZOO" not in variables \
            and "ZOO" not in os.environ:
        variables["ZOO"] = zoo_variable(args.zoo)
    return variables


def cmd_ablate(args: argparse.Namespace) -> int:
    from evomerge.ablate import load_grid, run_grid, validate_grid

    grid = load_grid(args.grid, _variables(args))
    if args.limit is not None:
        grid = grid.with_limit(args.limit)
    report = validate_grid(grid, config_only=args.validate_only, check_tasks=not args.no_task_check,
                           allow_pickle=args.allow_pickle)
    for w in dict.fromkeys(report.warnings):
        print(f"warning: {w}", file=sys.stderr)
    if report.problems:
        print(f"{args.grid}: {len(report.problems)} problem(s)", file=sys.stderr)
        for p in report.problems:
            print(f"  - {p}", file=sys.stderr)
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
        raise EvomergeError(f"rows {sorted(run.failed)} failed (see above); fix them and re-run "
                            "the same command: finished rows are kept")
    return 0


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser("ablate", help="score a grid of fixed recipes and their parents as one table",
                       description="Score every parent and recipe of a grid YAML on its eval sets and "
                                   "write table.csv/.md/.png; re-running resumes where it stopped.")
    p.add_argument("grid", help="grid YAML (see ablations/)")
    p.add_argument("--out", help=f"output folder (default: {DEFAULT_OUT}/<grid name>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--limit", type=_limit, help="docs per task for every eval set (a float < 1: a fraction)")
    p.add_argument("--var", type=_var, action="append", metavar="KEY=VALUE",
                   help="value of a ${KEY} placeholder in the grid (repeatable)")
    p.add_argument("--zoo", default="demo", choices=("demo", "fixture"),
                   help="zoo variant used for ${ZOO} when it is not given (default: demo)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept models that ship only pickle (.bin) weights (they can run code: trust them)")
    p.add_argument("--validate-only", action="store_true",
                   help="check every recipe (models from model_configs: config.json only, no weights) "
                        "and eval set, then stop")
    p.add_argument("--no-task-check", action="store_true",
                   help="skip checking task names against lm-eval's index (saves ~15 s)")
    return {"ablate": cmd_ablate}
