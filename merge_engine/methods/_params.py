"""Parameter declarations shared by several methods (building blocks, not a table).

Each method's ``SPEC`` still lists its own parameters explicitly; these helpers
only keep names, ranges and help texts spelled the same way everywhere.
"""

from __future__ import annotations

from merge_engine.methods.spec import Param

# A sanity bound for coefficients: wide enough for any published recipe
# (negative weights negate a task vector), narrow enough to catch typos.
COEF_LIMIT = 10.0


def weight(search: tuple[float, float] = (0.0, 1.0)) -> Param:
    return Param("weight", per_model=True, required=True, low=-COEF_LIMIT, high=COEF_LIMIT,
                 search=search, help="mixing coefficient of this model")


def density(search: tuple[float, float] = (0.1, 1.0)) -> Param:
    return Param("density", per_model=True, default=1.0, low=0.0, high=1.0, search=search,
                 help="fraction of this model's delta that is kept")


def normalize(default: bool) -> Param:
    return Param("normalize", per_model=False, default=default, kind="bool",
                 help="divide the merged delta by the sum of the weights")


def rescale(default: bool) -> Param:
    return Param("rescale", per_model=False, default=default, kind="bool",
                 help="rescale each sparsified delta back to its original L1 norm")


LAMBDA = Param("lambda", per_model=False, default=1.0, low=-COEF_LIMIT, high=COEF_LIMIT,
               search=(0.2, 1.2), help="scale applied to the merged delta after normalising")

INT8_MASK = Param("int8_mask", per_model=False, default=False, kind="bool",
                  help="accepted for mergekit compatibility (mask storage only); no numeric effect")

PAPER_RESCALE = Param("paper_rescale", per_model=False, default=False, kind="bool",
                      help="when rescaling, divide kept entries by their keep probability "
                           "(the paper's convention) instead of matching the L1 norm (mergekit's)")
