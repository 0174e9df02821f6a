"""Ablation grids: fixed merge recipes and their parents, scored on one task set, as one table.

    done = ablate("ablations/zoo_grid.yaml", variables={"ZOO": zoo_dir})  # the CLI's one call
    grid = load_grid("ablations/zoo_grid.yaml", {"ZOO": zoo_dir})   # every file problem at once
    report = validate_grid(grid)                                     # recipes, models, tasks
    run = run_grid(grid, "results/ablations/zoo")                    # resumes where it stopped

:mod:`~evomerge.ablate.grid` holds the file's schema, loading and validation;
:mod:`~evomerge.ablate.run` scores the rows; :mod:`~evomerge.ablate.table` persists the rows and
writes the table (CSV, Markdown, plot).
"""

from __future__ import annotations

from evomerge.ablate.grid import (
    EvalSet,
    Grid,
    GridError,
    GridRecipe,
    Parent,
    Row,
    expand_vars,
    grid_variables,
    load_grid,
    parse_grid,
    validate_grid,
)
from evomerge.ablate.run import DEFAULT_OUT, Ablation, AblationRun, ablate, run_grid
from evomerge.ablate.table import (
    build_table,
    load_row,
    markdown_table,
    plot_table,
    reproduce_commands,
    save_row,
    write_provenance,
    write_table,
)

__all__ = [
    "DEFAULT_OUT",
    "Ablation",
    "AblationRun",
    "ablate",
    "EvalSet",
    "Grid",
    "GridError",
    "GridRecipe",
    "Parent",
    "Row",
    "build_table",
    "expand_vars",
    "grid_variables",
    "load_grid",
    "load_row",
    "markdown_table",
    "parse_grid",
    "plot_table",
    "reproduce_commands",
    "run_grid",
    "save_row",
    "validate_grid",
    "write_provenance",
    "write_table",
]
