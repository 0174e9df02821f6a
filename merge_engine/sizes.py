"""Sizes written by users (``4GiB``, ``500M``, ``1.5G``, a byte count): options, spaces, the
environment."""

from __future__ import annotations

_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # binary units


def parse_bytes(text: str | int) -> int:
    """A size like ``4GiB``, ``500M``, ``1.5G`` or a byte count (binary units; ``B``/``iB``
    optional) -> bytes. Raises ``ValueError`` naming the text."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
        try:
            size = int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
        except (ValueError, OverflowError):
            raise ValueError(f"cannot read size {text!r}; use e.g. 4GiB, 500M or a byte count") from None
    if size < 0:
        raise ValueError(f"size {text!r} is negative; use e.g. 4GiB, 500M, or 0")
    return size
