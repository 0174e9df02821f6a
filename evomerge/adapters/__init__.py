"""The only code that touches private internals of lm-eval and optuna.

Each module here is pinned to the versions it is tested on (see pyproject.toml) and fails with
one clear line, naming the installed and the supported versions, when those internals moved.
"""

from __future__ import annotations

from evomerge.errors import EvomergeError


class UnsupportedVersionError(EvomergeError, ImportError):
    """An installed library is outside the version range an adapter is tested on."""


def require_version(name: str, installed: str | None, low: str, high: str, pip_spec: str) -> None:
    """Raise :class:`UnsupportedVersionError` unless ``installed`` (None: not installed) is in
    ``[low, high)``; the one line names the installed version, the tested range and the fix."""
    from packaging.version import InvalidVersion, Version

    try:
        ok = installed is not None and Version(low) <= Version(installed) < Version(high)
    except InvalidVersion:
        ok = False
    if ok:
        return
    found = f"{name} {installed} is installed" if installed else f"{name} is not installed"
    raise UnsupportedVersionError(
        f"{found}; evomerge needs {name} >={low},<{high}, the versions whose internals it is tested "
        f"on; run: pip install '{pip_spec}'")
