"""Errors of the search layer and the small helpers every command shares.

Each message is one line naming the problem and the fix. A file, grid or config with several
problems raises one :class:`ProblemsError` listing them all. Files a user keeps are written with
:func:`atomic_write` (temporary file + rename, normal permissions): never half a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from merge_engine.errors import validation_problems  # noqa: F401  (the one formatter, re-exported)
from merge_engine.io import current_umask


class EvomergeError(Exception):
    """Anything the user can fix: a bad search space, task, storage URL or option."""


class ProblemsError(EvomergeError):
    """Something read from a file or the command line is invalid; ``problems`` lists every
    problem found, one line each. The message is ``<source>: <problem>`` for one problem and
    ``<source>: N problems: a; b`` for several (``source`` names the file or the kind of input)."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = self.problems[0] if len(self.problems) == 1 else \
            f"{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(f"{source}: {head}" if source else head)


def temp_file_beside(path: Path) -> Path:
    """A new empty temporary file in ``path``'s folder (created if missing), with the
    permissions a normal new file gets (the umask applied, unlike ``mkstemp``'s 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())
    return Path(tmp)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place (flushed to disk
    first): readers see the old file or the whole new one, a crash leaves no half-written file."""
    path = Path(path)
    tmp = temp_file_beside(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path




class StorageError(EvomergeError):
    """The place results live cannot be used: an unreachable or corrupt study database, a folder
    that holds another study's results, a read-only or full disk."""


# One exit code per kind of outcome, the same for every command (listed in `evomerge --help`).
EXIT_CODES = {
    0: "success",
    1: "the command ran but its result is a failure (problems found, no trial finished)",
    2: "bad input: a file, option or model to fix (the message says how)",
    3: "storage or disk: database unreachable or corrupt, folder in use, disk read-only or full",
    130: "interrupted (Ctrl-C); finished work is kept, the same command resumes",
}
EXIT_FAILED, EXIT_INPUT, EXIT_STORAGE, EXIT_INTERRUPTED = 1, 2, 3, 130


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A folder beside ``target`` to build in, swapped into place whole when the block ends (an
    older ``target`` is moved aside first and removed after the swap): readers see the old folder
    or the whole new one; an exception removes the half-built folder and leaves ``target`` as it
    was. The folder gets the umask's permissions, as a normal new folder would."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(build, 0o777 & ~current_umask())
    old = None
    try:
        yield build
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
