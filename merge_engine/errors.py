"""Errors raised by merge_engine. Each message is one line naming the problem and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


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


def validation_problems(err: ValidationError) -> list[str]:
    """One line per problem of a pydantic error, ``location: message`` (the one formatter of
    recipe, search-space, grid and eval-config schema errors).

    A union field repeats one problem per alternative: only the first of each location is kept.
    A message of several lines (a cross-field rule listing all its problems) gives one line each.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if loc and loc in seen:
            continue
        seen.add(loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {e['loc'][-1]!r}; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required key is missing"
        problems += [f"{loc}: {line}" if loc else line for line in msg.split("\n")]
    return list(dict.fromkeys(problems))
