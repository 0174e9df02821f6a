"""What several commands share: option parsers, problem reports, the progress line, and keeping
lm-eval's per-candidate output off the terminal. Imports stay light (no torch, no lm-eval)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from merge_engine.sizes import parse_bytes


Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- commands
def add_debug_option(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``--debug``: on the top parser (``evomerge --debug merge ...``) and on every subcommand
    (``evomerge merge ... --debug``). A subcommand's copy sets nothing unless given, so it does
    not reset a ``--debug`` given before the subcommand."""
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show tracebacks on errors")


def add_command(sub: argparse._SubParsersAction, name: str, handler: Handler | None,
                **kwargs) -> argparse.ArgumentParser:
    """Add subcommand ``name`` run by ``handler(args) -> exit code`` (``args.handler``); a group
    of subcommands (``zoo``) has no handler of its own."""
    p = sub.add_parser(name, **kwargs)
    add_debug_option(p)
    if handler is not None:
        p.set_defaults(handler=handler)
    return p


# ---------------------------------------------------------------- option parsers
def parse_size(text: str) -> int:
    """Parse a size like 5GB, 500M, 1.5G, 1048576 (above 0)."""
    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive; use e.g. 5G, 500M")
    return size


def parse_limit(text: str) -> int | float:
    """``--limit``: a number of docs per task (``100``) or a fraction of each task (``0.1``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--limit takes a number of docs per task or a fraction below 1, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--limit must be a positive number, got {text!r}")
    if value >= 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(
            f"--limit {text!r}: give a whole number of docs, or a fraction below 1")
    return int(value) if value >= 1 else value


def whole_number(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An option parser for a whole number >= ``minimum``; ``meaning`` explains special values
    in the error (e.g. "0 means the space's budget")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            extra = f" ({meaning})" if meaning else ""
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}{extra}, got {text!r}")
        return value
    return parse


def positive_seconds(text: str) -> float:
    """A duration in seconds: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def parse_var(text: str) -> tuple[str, str]:
    """``--var NAME=VALUE``: the value of a ``${NAME}`` placeholder in a YAML file."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--var {text!r}: expected NAME=VALUE")
    return name, value


def add_var_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--var NAME=VALUE`` (repeatable); ``dict(args.var)`` gives the variables."""
    p.add_argument("--var", type=parse_var, action="append", default=[], metavar="NAME=VALUE",
                   help=f"value for ${{NAME}} in the {what} (repeatable)")


def add_limit_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--limit", type=parse_limit, default=None, help=help)


# ---------------------------------------------------------------- reports
def warn(warnings: Iterable[str]) -> None:
    """Each warning once, on stderr, in the order first seen."""
    for w in dict.fromkeys(warnings):
        print(f"warning: {w}", file=sys.stderr)


def print_report(source: object, report) -> int:
    """Print a validation report (``.problems``, ``.warnings``) as ``<source>: N problem(s)`` and
    one ``  - problem`` line each on stderr; 0 when there are none, 1 otherwise."""
    warn(report.warnings)
    if not report.problems:
        return 0
    print(f"{source}: {len(report.problems)} problem(s)", file=sys.stderr)
    for p in report.problems:
        print(f"  - {p}", file=sys.stderr)
    return 1


def built_zoo(variant: str) -> Path:
    """The tiny zoo of ``variant`` in its default folder; returns at once when that folder holds
    this variant's build, else builds it first (minutes, progress on stderr)."""
    from evomerge.zoo import build_zoo, default_zoo_dir

    folder = Path(default_zoo_dir(variant))
    build_zoo(folder, variant=variant, log=lambda text: print(text, file=sys.stderr))
    return folder


# ---------------------------------------------------------------- long runs
# Library messages that are noise to a user: (logger, start of the message). Each is filtered by
# its exact logger and text, so every other warning of those libraries still shows.
NOISE = (
    # optuna's GP sampler falls back to sequential L-BFGS-B without greenlet: correct, just slower
    ("optuna._gp.batched_lbfgsb", "The 'greenlet' package is unavailable"),
    # lm-eval warns whenever it is handed a loaded model, which is how every candidate is scored
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
)


class _DropMessage:
    def __init__(self, start: str) -> None:
        self.start = start

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_noise() -> None:
    """Filter the :data:`NOISE` log messages and optuna's heartbeat warning (our ask/tell loop
    records heartbeats itself); idempotent. Runs before those libraries are imported."""
    import logging
    import warnings

    for name, start in NOISE:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in log.filters):
            log.addFilter(_DropMessage(start))
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def quiet_libraries() -> None:
    """lm-eval logs a few lines per candidate; our progress line replaces them."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def library_output_hidden(verbose: bool) -> Iterator[None]:
    """lm-eval draws progress bars on stderr for every candidate (it passes ``disable=``
    explicitly, so TQDM_DISABLE cannot stop them); hide them unless ``--verbose``. Our own
    progress line writes to the real stderr. Exceptions still reach the caller."""
    if verbose:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


class ProgressLine:
    """``trial 7 complete (3.1s) | finished 5/20 | best (trial 4) … | this … | ETA …``: one
    rewritten line on a terminal, else one per trial. "trial N" is always the trial's number,
    the one report.txt and best/NN_trialNNNN.yaml use."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, p) -> None:
        fmt = lambda vs: "/".join(f"{v:.4f}" for v in vs) if vs else "-"  # noqa: E731
        eta = f"{p.eta:.0f}s" if p.eta is not None else "?"
        best = f"best (trial {p.best_trial}) {fmt(p.best)}" if p.best_trial is not None else "best -"
        text = (f"trial {p.trial} {p.state.lower()} ({p.seconds:.1f}s) | finished {p.done}/{p.total} | "
                f"{best} | this {fmt(p.values)} | ETA {eta}")
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def log(self, text: str) -> None:
        """One line of a step that takes seconds (loading, building tasks, held-out scoring,
        writing), on the same stream (lm-eval's output may be hidden meanwhile)."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
