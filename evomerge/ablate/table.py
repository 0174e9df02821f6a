"""What a run leaves on disk: provenance files, one JSON per finished row, and the table.

Under ``out_dir``:

    rows/<row>.yaml      the recipe of a merge row, with resolved model paths (mergekit YAML)
    rows/<row>.json      the row's scores per eval set, fingerprint, versions, timing
    eval/<set>.yaml      each eval set's full EvalConfig
    table.csv, table.md, table.png   models as rows, tasks as columns, an average column

Every file is written atomically (temporary file + rename): a crash never leaves half a row, and
:func:`load_row` treats a row whose fingerprint differs from the grid's as not finished.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.ablate.grid import Grid, Row
from evomerge.errors import atomic_write
from evomerge.evaluate.result import EvalResult, weighted_score


def write_provenance(grid: Grid, out_dir: Path) -> None:
    """``eval/<set>.yaml`` and ``rows/<merge>.yaml``: what re-runs any row alone."""
    for es in grid.evals:
        atomic_write(out_dir / "eval" / f"{es.name}.yaml",
                      yaml.safe_dump(es.config.model_dump(mode="json"), sort_keys=False))
    for r in grid.recipes:
        atomic_write(out_dir / "rows" / f"{r.name}.yaml", r.recipe.to_yaml())


def reproduce_commands(grid: Grid, row: Row, out_dir: Path) -> list[str]:
    """Shell commands that score ``row`` alone (one ``evomerge eval`` per eval set)."""
    from merge_engine.io.resolve import looks_local

    if row.kind == "parent":  # `evomerge eval` takes a directory; `hf download` prints the cached one
        model = row.model if looks_local(row.model) else f'"$(hf download {row.model})"'
        cmds = []
    else:
        model = f"/tmp/evomerge-{grid.name}-{row.name}"
        cmds = [f"evomerge merge {out_dir / 'rows' / (row.name + '.yaml')} {model}"]
    return cmds + [f"evomerge eval {model} --preset {out_dir / 'eval' / (es.name + '.yaml')}"
                   for es in grid.evals]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("evomerge", "torch", "transformers", "lm_eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def save_row(out_dir: Path, grid: Grid, row: Row, results: Mapping[str, EvalResult], *,
             mode: str, device: str, seconds: float) -> Path:
    """Persist one finished row atomically (temp file + rename): a crash never leaves half a row."""
    record = {
        "name": row.name, "kind": row.kind, "fingerprint": grid.fingerprint(row),
        "model": row.model, "recipe_file": None if row.recipe is None else f"rows/{row.name}.yaml",
        "seed": None if row.recipe is None else row.recipe.seed,
        "evals": {name: r.to_dict() for name, r in results.items()},
        "mode": mode, "device": device, "seconds": round(seconds, 3), "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reproduce": reproduce_commands(grid, row, out_dir),
    }
    path = out_dir / "rows" / f"{row.name}.json"
    atomic_write(path, json.dumps(record, indent=2) + "\n")
    return path


def load_row(out_dir: Path, name: str, fingerprint: str) -> dict[str, dict[str, Any]] | None:
    """The finished row's results by eval set, or None if absent, unreadable or stale."""
    path = Path(out_dir) / "rows" / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    return record.get("evals")


# ---------------------------------------------------------------- the table
def build_table(grid: Grid, out_dir: Path):  # -> pandas.DataFrame
    """Finished rows × task values, plus ``avg`` (and ``avg_<set>`` with several eval sets).

    ``avg`` is the weighted score of all tasks (Σ w·v / Σ|w|: the plain mean with unit weights).
    Rows not finished yet are left out. Column names are task names; ``df.attrs["metrics"]``
    maps each to the metric it shows.
    """
    import pandas as pd

    records, metrics = [], {}
    for row in grid.rows():
        evals = load_row(out_dir, row.name, grid.fingerprint(row))
        if evals is None:
            continue
        line: dict[str, Any] = {"model": row.name, "kind": row.kind}
        every = []
        for es in grid.evals:
            scores = EvalResult.from_dict(evals[es.name]).tasks
            every += scores
            for t in scores:
                line[t.task] = t.value
                metrics[t.task] = t.metric
            if len(grid.evals) > 1:
                line[f"avg_{es.name}"] = weighted_score(scores)
        line["avg"] = weighted_score(every)
        records.append(line)
    df = pd.DataFrame(records)
    df.attrs["metrics"] = metrics
    return df


def write_table(grid: Grid, out_dir: Path) -> dict[str, Path]:
    """``table.csv``, ``table.md`` and ``table.png`` from the finished rows (none if no row is)."""
    df = build_table(grid, out_dir)
    if df.empty:
        return {}
    files = {"csv": out_dir / "table.csv", "md": out_dir / "table.md", "png": out_dir / "table.png"}
    atomic_write(files["csv"], df.to_csv(index=False, float_format="%.6g"))
    atomic_write(files["md"], markdown_table(grid, df))
    plot_table(grid, df, files["png"])
    return files


def _value_columns(df) -> list[str]:
    return [c for c in df.columns if c not in ("model", "kind")]


def markdown_table(grid: Grid, df) -> str:
    """A Markdown table; the best value of each column is bold (higher is better)."""
    cols = _value_columns(df)
    metrics = df.attrs.get("metrics", {})
    head = ["model"] + [f"{c} ({metrics[c].split(',')[0]})" if c in metrics else c for c in cols]
    lines = [f"# {grid.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    best = {c: df[c].max() for c in cols}
    for _, r in df.iterrows():
        cells = [r["model"] + (" *(parent)*" if r["kind"] == "parent" else "")]
        for c in cols:
            v = r[c]
            text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
            cells.append(f"**{text}**" if text and v == best[c] and len(df) > 1 else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each merge row's recipe is `rows/<model>.yaml`; each eval set is `eval/<set>.yaml`; "
              "`rows/<model>.json` holds the scores, stderrs, versions and the commands that re-run it."]
    return "\n".join(lines) + "\n"


def plot_table(grid: Grid, df, path: Path) -> None:
    """Grouped bars: one group per task (and average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _value_columns(df)
    n = len(df)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cols) * max(1, n) * 0.45 + 2), 4.2))
    for i, (_, r) in enumerate(df.iterrows()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [r[c] for c in cols], width, label=r["model"],
               hatch="//" if r["kind"] == "parent" else None, edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title(grid.name)
    ax.legend(fontsize="small", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, png.getvalue())
