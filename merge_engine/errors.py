"""Errors raised by merge_engine. Each message is one line naming the problem and the fix."""

from __future__ import annotations


class MergeError(Exception):
    """Base class: anything the user can fix (bad recipe, bad checkpoint, bad value)."""


class RecipeError(MergeError):
    """The recipe is invalid. ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the recipe: " + "; ".join(self.problems)
        super().__init__(msg)


class UnknownMethodError(RecipeError):
    """A merge method name is not registered."""


class CheckpointError(MergeError):
    """A model checkpoint is missing, unreadable, corrupt or refused."""


class NonFiniteError(MergeError):
    """A tensor holds NaN or inf (in an input, or produced by a merge)."""


class OutputExistsError(MergeError):
    """The output directory exists and --force was not given."""
