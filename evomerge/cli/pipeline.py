"""``evomerge pipeline PIPELINE.yaml``: several searches in one command, each over the best merge
of the ones before (see :mod:`evomerge.pipeline`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evomerge.cli.common import (ProgressLine, add_command, add_var_option, library_output_hidden,
                                 quiet_libraries)
from evomerge.devices import DEVICE_HELP, device_arg


def cmd_pipeline(args: argparse.Namespace) -> int:
    quiet_libraries()
    from evomerge.pipeline import load_pipeline, run_pipeline
    from evomerge.search.run import quiet_optuna
    from evomerge.search.study import redact

    pipeline = load_pipeline(args.pipeline, variables=dict(args.var))
    out = Path(args.out or f"runs/{Path(args.pipeline).stem}")
    # --var folders go back to ${NAME} in the result files (portable recipes)
    placeholders = {k: v for k, v in args.var if Path(v).expanduser().is_dir()}
    line = ProgressLine(sys.stderr)
    print(f"pipeline {args.pipeline}: stages {', '.join(s.name for s in pipeline.stages)}, output {out}",
          file=sys.stderr)
    with quiet_optuna(), library_output_hidden(args.verbose):
        summary = run_pipeline(pipeline, out, storage=args.storage, device=args.device, progress=line,
                               log=line.log, placeholders=placeholders)
    line.finish()
    print(f"stages searched now: {', '.join(summary.ran) or 'none'}"
          + (f"; already done: {', '.join(summary.skipped)}" if summary.skipped else ""))
    print(f"final multi-stage recipe: {summary.final} (evomerge merge {summary.final} OUT_DIR); "
          f"studies in {redact(summary.storage)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "pipeline", cmd_pipeline,
                    help="run several searches in order, each over the best merges before it (resumable)")
    p.add_argument("pipeline", help="pipeline YAML: search spaces as documents joined by ---")
    p.add_argument("--out", help="output directory (default: runs/<pipeline file name>)")
    p.add_argument("--storage", help="Optuna storage URL for every stage's study "
                                     "(default: sqlite in the output dir, pipeline.db)")
    p.add_argument("--device", type=device_arg, default="auto",
                   help=f"device for merging and evaluation: {DEVICE_HELP}")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's progress bars and warnings")
    add_var_option(p, "pipeline file")
