"""Errors of the search layer. Each message is one line naming the problem and the fix."""

from __future__ import annotations


class EvomergeError(Exception):
    """Anything the user can fix: a bad search space, task, storage URL or option."""
