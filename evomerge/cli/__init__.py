"""The ``evomerge`` command: a thin shell over the library.

Each command group lives in its own module (:mod:`~evomerge.cli.merge`, ``eval``, ``zoo``,
``search``, ``ablate``) with a ``register(subparsers)`` that adds its subcommands; each
subcommand parses, validates, calls one library function and prints. Modules import the library
inside their handlers, so ``evomerge --help`` stays fast. :func:`main` turns the errors a user
can fix (:class:`~merge_engine.errors.MergeError`, :class:`~evomerge.errors.EvomergeError`) into
one line and exit code 2 (``--debug``: the traceback), Ctrl-C into exit code 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from evomerge.cli import ablate, eval as eval_, merge, search, zoo
from evomerge.cli.common import add_debug_option
from evomerge.errors import EvomergeError
from merge_engine.errors import MergeError

# The command groups, in the order `evomerge --help` lists them.
GROUPS = (merge, eval_, zoo, search, ablate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model-merge search.")
    add_debug_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from merge_engine.allocator import keep_freed_memory

    keep_freed_memory()
    try:
        return args.handler(args)
    except (MergeError, EvomergeError) as err:
        if args.debug:
            raise
        print(f"evomerge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
