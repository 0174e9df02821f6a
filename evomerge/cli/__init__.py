"""The ``evomerge`` command: a thin shell over the library.

Each command group lives in its own module (:mod:`~evomerge.cli.merge`, ``eval``, ``zoo``,
``search``, ``ablate``) with a ``register(subparsers)`` that adds its subcommands; each
subcommand parses, validates, calls one library function and prints. Modules import the library
inside their handlers, so ``evomerge --help`` stays fast. :func:`main` turns the errors a user
can fix (:class:`~merge_engine.errors.MergeError`, :class:`~evomerge.errors.EvomergeError`, an
``OSError`` of the disk) into one line and the exit code of their kind
(:data:`evomerge.errors.EXIT_CODES`; ``--debug``: the traceback), Ctrl-C into exit code 130.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence

from evomerge.cli import ablate, eval as eval_, merge, moe, pipeline, search, zoo
from evomerge.cli.common import add_debug_option, silence_noise
from evomerge.errors import (EXIT_CODES, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STORAGE, EvomergeError,
                             StorageError)
from merge_engine.errors import MergeError

# The command groups, in the order `evomerge --help` lists them.
GROUPS = (merge, moe, eval_, zoo, search, pipeline, ablate)


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model-merge search.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from merge_engine.allocator import keep_freed_memory

    keep_freed_memory()
    silence_noise()
    try:
        return args.handler(args)
    except (MergeError, EvomergeError, OSError) as err:
        if args.debug:
            raise
        print(f"evomerge: error: {_one_line(err)}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print("evomerge: interrupted; finished trials and files are kept, run the same command "
              "to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


# OSErrors that mean "the disk or its permissions", not "a wrong path given"
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def _disk_error(err: BaseException | None) -> bool:
    return isinstance(err, OSError) and err.errno in _DISK_ERRNOS


def exit_code(err: BaseException) -> int:
    """The exit code of an error's kind: storage and disk errors (a :class:`StorageError`, a full,
    read-only or forbidden disk, or an error raised while handling one, like the engine's "disk
    full") are 3, every other error a user can fix (a missing file included) is 2."""
    disk = isinstance(err, StorageError) or _disk_error(err) or _disk_error(err.__context__)
    return EXIT_STORAGE if disk else EXIT_INPUT


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, EvomergeError):
        where = f" {err.filename}" if err.filename else ""
        if _disk_error(err):
            return (f"cannot write or read{where}: {err.strerror or err}; check the disk space and "
                    "permissions of that folder")
        return f"{err.strerror or err}:{where or ' (no file named)'}; check the path"
    return " ".join(str(err).split("\n"))
