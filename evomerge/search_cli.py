"""``evomerge search | export | demo``: thin shells over :mod:`evomerge.search` and :mod:`evomerge.results`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_SPACE = REPO / "search_spaces" / "zoo_demo.yaml"


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    from evomerge.search.samplers import GP_MAX_PARAMS, SAMPLERS

    p = sub.add_parser("search", help="search merge recipes with Optuna (resumes an existing study)")
    p.add_argument("space", help="search space YAML (see search_spaces/)")
    _add_run_options(p)
    p.add_argument("--study", help="study name (default: the space's name)")
    p.add_argument("--sampler", choices=list(SAMPLERS),
                   help=f"default: gp for one objective over <= {GP_MAX_PARAMS} parameters, cmaes over more, "
                        "nsga2 for several objectives")
    p.add_argument("--timeout", type=float, help="stop asking for new trials after S seconds")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in the output dir)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="value for ${NAME} in the space file (repeatable)")

    p = sub.add_parser("export", help="rebuild trials.csv, best/ and plots from a study's storage")
    p.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///runs/x/study.db")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("worker", help="join a running search: evaluate candidates of a stored study")
    p.add_argument("--storage", required=True, help="Optuna storage URL shared by the workers")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--trials", type=int, help="finished trials to reach (default: the study's budget)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's progress bars and warnings")

    p = sub.add_parser("demo", help="build the tiny zoo if needed and run a short merge search on it")
    _add_run_options(p, default_out=None)
    return {"search": cmd_search, "export": cmd_export, "worker": cmd_worker, "demo": cmd_demo}


def _add_run_options(p: argparse.ArgumentParser, default_out: str | None = None) -> None:
    p.add_argument("--trials", type=int, help="finished trials to reach (default: the space's budget)")
    p.add_argument("--out", default=default_out,
                   help="output directory (default: runs/<space name> or runs/demo-<time>)")
    p.add_argument("--materialize", action="store_true", help="also write the best merge as a model")
    p.add_argument("--device", default="cpu", help="device for merging and evaluation (default: cpu)")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's progress bars and warnings")


# ---------------------------------------------------------------- commands
def cmd_search(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from evomerge.search.run import RunOptions
    from evomerge.space import load_space

    space = load_space(args.space, variables=_vars(args.var))
    options = RunOptions(out_dir=Path(args.out or f"runs/{space.name}"), storage=args.storage,
                         study_name=args.study, sampler=args.sampler, trials=args.trials,
                         timeout=args.timeout, materialize=args.materialize, device=args.device)
    return _run(space, options, args.verbose)


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.results import export_study

    files = export_study(args.storage, args.study, args.out)
    print(f"exported study {args.study} to {args.out}: " + ", ".join(sorted(files)))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from evomerge.search.run import quiet_optuna, run_worker

    line = ProgressLine(sys.stderr)
    with quiet_optuna(), _library_output_hidden(args.verbose):
        summary = run_worker(args.storage, args.study, trials=args.trials, device=args.device,
                             progress=line)
    line.finish()
    print(f"study {summary.study_name}: {summary.finished} finished trials"
          + (f"; stopped early: {summary.stopped}" if summary.stopped else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from evomerge.search.run import RunOptions
    from evomerge.space import load_space
    from evomerge.zoo import build_zoo, default_zoo_dir

    start = time.monotonic()
    zoo = Path(default_zoo_dir("demo"))
    # Cached: returns at once when this zoo version is already built.
    build_zoo(zoo, variant="demo", log=lambda msg: print(msg, file=sys.stderr))
    space = load_space(DEMO_SPACE, variables={"ZOO": str(zoo)})
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    options = RunOptions(out_dir=out, trials=args.trials, materialize=args.materialize,
                         device=args.device)
    code = _run(space, options, args.verbose)
    print(f"demo finished in {time.monotonic() - start:.0f}s (zoo build included)")
    return code


# ---------------------------------------------------------------- shared
def _vars(pairs: list[str]) -> dict[str, str]:
    from evomerge.errors import EvomergeError

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise EvomergeError(f"--var {pair!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _quiet_libraries() -> None:
    """lm-eval logs a few lines per candidate; our progress line replaces them."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _library_output_hidden(verbose: bool):
    """lm-eval draws progress bars on stderr for every candidate (it passes ``disable=``
    explicitly, so TQDM_DISABLE cannot stop them); hide them unless ``--verbose``. Our own
    progress line writes to the real stderr. Exceptions still reach the caller."""
    if verbose:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def _run(space, options, verbose: bool = False) -> int:
    _quiet_libraries()
    from evomerge.results import report_table
    from evomerge.search.run import quiet_optuna, run_search
    from evomerge.search.samplers import default_sampler
    from evomerge.search.study import redact
    from evomerge.space import distributions

    line = ProgressLine(sys.stderr)
    print(f"search {space.name}: {len(distributions(space))} parameters, sampler "
          f"{options.sampler or default_sampler(space)}, output {options.out_dir}", file=sys.stderr)
    with quiet_optuna(), _library_output_hidden(verbose):
        summary = run_search(space, options, progress=line)
    line.finish()
    import optuna

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


class ProgressLine:
    """``trial i/N | best … | last … | ETA …``: one rewritten line on a terminal, else one per trial."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, p) -> None:
        fmt = lambda vs: "/".join(f"{v:.4f}" for v in vs) if vs else "-"  # noqa: E731
        eta = f"{p.eta:.0f}s" if p.eta is not None else "?"
        text = (f"trial {p.done}/{p.total} (#{p.trial} {p.state.lower()}, {p.seconds:.1f}s) | "
                f"best {fmt(p.best)} | last {fmt(p.values)} | ETA {eta}")
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
