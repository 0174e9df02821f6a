"""A private PostgreSQL server for tests: ``from pg import postgres_url`` in a test module.

``postgres_url`` (session-scoped) runs initdb into a fresh temporary directory, starts the server
on 127.0.0.1 on a free port (socket in that directory, trust authentication), creates a database
and yields ``postgresql+psycopg2://postgres@127.0.0.1:PORT/evomerge_test``; at the end it stops
the server and removes the directory. ~1.5 s.

It skips only when the PostgreSQL server binaries are missing (set ``PG_BIN`` to their folder if
they are not in the usual places). As root it runs them as the ``postgres`` user (initdb refuses
root). Any other failure to start is an error, with the server's log.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

DATABASE = "evomerge_test"


def pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)  # Debian, newest first
    candidates += [str(Path(p).parent) for p in (shutil.which("pg_ctl"),) if p]
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> list[str]:
    """Prefix that runs a command as the server's owner: `postgres` when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("running as root needs `runuser` to start PostgreSQL as the postgres user")
    return [runuser, "-u", "postgres", "--"]


def _run(cmd: list[str], log: Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        server_log = log.read_text() if log.is_file() else ""
        pytest.fail(f"{' '.join(cmd[-3:])} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                    f"\nserver log:\n{server_log}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    binaries = pg_bin()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql "
                    "or set PG_BIN to their folder")
    user = _as_server_user()
    # Not under pytest's tmp_path: its parents are private to us, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    data, log = root / "data", root / "server.log"
    if user:
        shutil.chown(root, "postgres")
    port = free_port()
    started = False
    try:
        _run([*user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
              "--no-sync", "-E", "UTF8"], log)
        _run([*user, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], log)
        started = True
        _run([*user, str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
              DATABASE], log)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            subprocess.run([*user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
