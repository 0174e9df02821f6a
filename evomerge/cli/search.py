"""``evomerge search | export | worker | demo``: the merge search and its results."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.cli.common import (
    ProgressLine,
    add_command,
    add_var_option,
    built_zoo,
    library_output_hidden,
    positive_seconds,
    quiet_libraries,
    whole_number,
)
from evomerge.devices import DEVICE_HELP, device_arg

if TYPE_CHECKING:
    from evomerge.search.run import RunOptions

TRIALS_HELP = ("finished trials to reach (default, or 0: the {}'s budget); a resumed study counts "
               "the trials it already finished")
trial_count = whole_number(0, "0 means the budget")

REPO = Path(__file__).resolve().parents[2]
DEMO_SPACE = REPO / "search_spaces" / "zoo_demo.yaml"


def cmd_search(args: argparse.Namespace) -> int:
    from evomerge.cli.moe import cmd_moe_search, is_moe_space_file

    if is_moe_space_file(args.space):  # a moe: block: the candidates are MoE builds (docs/moe.md)
        return cmd_moe_search(args)
    quiet_libraries()
    from evomerge.space import load_space

    space = load_space(args.space, variables=dict(args.var))
    return _run(space, run_options(args, space.name), args.verbose)


def run_options(args: argparse.Namespace, space_name: str) -> RunOptions:
    """The ``RunOptions`` of a ``search`` command line (a parameter space or an MoE space)."""
    from evomerge.search.run import RunOptions

    return RunOptions(out_dir=Path(args.out or f"runs/{space_name}"), storage=args.storage,
                      study_name=args.study, sampler=args.sampler, trials=args.trials,
                      timeout=args.timeout, materialize=args.materialize, device=args.device,
                      # --var folders go back to ${NAME} in the result files (portable recipes)
                      placeholders={k: v for k, v in args.var if Path(v).expanduser().is_dir()})


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.results import export_study

    files = export_study(args.storage, args.study, args.out)
    print(f"exported study {args.study} to {args.out}: " + ", ".join(sorted(files)))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    quiet_libraries()
    from evomerge.search.run import quiet_optuna, run_worker

    line = ProgressLine(sys.stderr)
    with quiet_optuna(), library_output_hidden(args.verbose):
        summary = run_worker(args.storage, args.study, trials=args.trials, device=args.device,
                             progress=line, log=line.log)
    line.finish()
    print(f"study {summary.study_name}: {summary.finished} finished trials"
          + (f"; stopped early: {summary.stopped}" if summary.stopped else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    quiet_libraries()
    from evomerge.search.run import RunOptions
    from evomerge.space import load_space

    start = time.monotonic()
    zoo = built_zoo("demo")  # cached: returns at once when this zoo version is already built
    space = load_space(DEMO_SPACE, variables={"ZOO": str(zoo)})
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    options = RunOptions(out_dir=out, trials=args.trials, materialize=args.materialize,
                         device=args.device, placeholders={"ZOO": str(zoo)})
    code = _run(space, options, args.verbose)
    print(f"demo finished in {time.monotonic() - start:.0f}s (zoo build included)")
    return code


def _run(space, options, verbose: bool = False) -> int:
    """Run the search with a progress line, then print the best trial and where results are."""
    quiet_libraries()
    import optuna

    from evomerge.results import report_table
    from evomerge.search.run import quiet_optuna, run_search
    from evomerge.search.samplers import default_sampler
    from evomerge.search.study import redact
    from evomerge.space import distributions

    line = ProgressLine(sys.stderr)
    print(f"search {space.name}: {len(distributions(space))} parameters, sampler "
          f"{options.sampler or default_sampler(space)}, output {options.out_dir}", file=sys.stderr)
    with quiet_optuna(), library_output_hidden(verbose):
        summary = run_search(space, options, progress=line, log=line.log)
    line.finish()
    study = optuna.load_study(study_name=summary.study_name, storage=summary.storage)
    print(report_table(study, k=1))
    saved = summary.samples_without_pruning - summary.samples
    print(f"{summary.finished} finished trials; {summary.samples} samples evaluated"
          + (f" ({saved} saved by cheap-first pruning)" if space.pruning and saved > 0 else ""))
    print(f"results in {summary.out_dir}/ (best/, trials.csv, plots/); study {summary.study_name} "
          f"in {redact(summary.storage)}")
    if summary.stopped:
        print(f"stopped early: {summary.stopped}", file=sys.stderr)
    return 1 if summary.stopped and summary.finished == 0 else 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=trial_count, default=0, help=TRIALS_HELP.format("space"))
    p.add_argument("--out", help="output directory (default: runs/<space name> or runs/demo-<time>)")
    p.add_argument("--materialize", action="store_true", help="also write the best merge as a model")
    p.add_argument("--device", type=device_arg, default="auto",
                   help=f"device for merging and evaluation: {DEVICE_HELP}")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's progress bars and warnings")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "search", cmd_search,
                    help="search merge recipes with Optuna (resumes an existing study)")
    p.add_argument("space", help="search space YAML (see search_spaces/)")
    _add_run_options(p)
    p.add_argument("--study", help="study name (default: the space's name)")
    p.add_argument("--sampler", metavar="NAME",
                   help="an Optuna sampler by name (an unknown name lists the known ones); default: "
                        "gp for one objective over few parameters, coarse-to-fine (a GP over per-model "
                        "values tied across layers, then CMA-ES over all) over many per-layer ones, "
                        "cmaes over many others, nsga2 for several objectives")
    p.add_argument("--timeout", type=positive_seconds, metavar="S",
                   help="stop asking for new trials after S seconds (default: the space's budget)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in the output dir)")
    add_var_option(p, "space file")

    p = add_command(sub, "export", cmd_export,
                    help="rebuild trials.csv, best/ and plots from a study's storage")
    p.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///runs/x/study.db")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--out", required=True, help="output directory")

    p = add_command(sub, "worker", cmd_worker,
                    help="join a running search: evaluate candidates of a stored study")
    p.add_argument("--storage", required=True, help="Optuna storage URL shared by the workers")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--trials", type=trial_count, default=0, help=TRIALS_HELP.format("study"))
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--verbose", action="store_true", help="show lm-eval's progress bars and warnings")

    p = add_command(sub, "demo", cmd_demo,
                    help="build the tiny zoo if needed and run a short merge search on it")
    _add_run_options(p)
