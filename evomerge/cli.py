"""The ``evomerge`` command: a thin shell; each subcommand parses, validates and calls one function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _size(text: str) -> int:
    """Parse a size like 5GB, 500M, 1.5G, 1048576."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; use e.g. 5G, 500M or a byte count")


def _command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------- merge engine
@_command("merge")
def cmd_merge(args: argparse.Namespace) -> int:
    from merge_engine.merge import run_merge
    from merge_engine.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    bar = None
    if not args.dry_run and sys.stderr.isatty() or os.environ.get("EVOMERGE_PROGRESS"):
        from tqdm import tqdm
        bar = tqdm(total=0, unit="tensor", desc="merging", leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    result = run_merge(recipe, args.out, device=args.device, shard_size=args.shard_size,
                       allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                       force=args.force, dry_run=args.dry_run, progress=progress)
    if bar is not None:
        bar.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.dry_run:
        print(f"{args.recipe}: valid; would write {result.tensors} tensors to {args.out}")
    else:
        print(f"merged {result.tensors} tensors into {result.out_dir} in {result.seconds:.2f}s")
    return 0


@_command("validate")
def cmd_validate(args: argparse.Namespace) -> int:
    from merge_engine.session import validate

    configs = None
    if args.model_config:
        configs = {}
        for item in args.model_config:
            ref, sep, folder = item.partition("=")
            if not sep or not ref or not folder:
                raise EvomergeError(f"--model-config {item!r} must look like org/name=DIR")
            configs[ref] = folder
    report = validate(args.recipe, with_models=not args.no_models or configs is not None,
                      model_configs=configs, allow_pickle=args.allow_pickle,
                      trust_remote_code=args.trust_remote_code)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if report.ok:
        print(f"{args.recipe}: ok")
        return 0
    print(f"{args.recipe}: {len(report.problems)} problem(s)", file=sys.stderr)
    for p in report.problems:
        print(f"  - {p}", file=sys.stderr)
    return 1


from evomerge.errors import EvomergeError  # noqa: E402  (light: no heavy imports)
from merge_engine.io import DEFAULT_SHARD_SIZE  # noqa: E402  (light: a constant)


def _add_engine_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models as a recipe YAML says")
    p.add_argument("recipe", help="mergekit-compatible recipe YAML")
    p.add_argument("out", help="output model directory")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: cuda if present)")
    p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_SIZE, help="max shard size, e.g. 5G (default)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickle .bin checkpoints")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--dry-run", action="store_true", help="validate and plan only; write nothing")

    p = sub.add_parser("validate", help="check a recipe and its models; lists every problem")
    p.add_argument("recipe")
    p.add_argument("--no-models", action="store_true", help="check the recipe only, not the model files")
    p.add_argument("--model-config", action="append", default=[], metavar="REPO=DIR",
                   help="validate model REPO from DIR/config.json alone (no weights needed); repeatable")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")


def _add_optional_parsers(sub: argparse._SubParsersAction) -> None:
    """Subcommands that live with their library modules."""
    import importlib

    for module in ("evomerge.evaluate.cli", "evomerge.zoo_cli", "evomerge.search_cli",
                   "evomerge.ablate_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue
            raise
        COMMANDS.update(mod.register(sub))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model-merge search.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_engine_parsers(sub)
    _add_optional_parsers(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from merge_engine.errors import MergeError

    errors: list[type[BaseException]] = [MergeError]
    try:
        from evomerge.errors import EvomergeError
        errors.append(EvomergeError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from merge_engine.allocator import keep_freed_memory

    keep_freed_memory()
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as err:
        if args.debug:
            raise
        print(f"evomerge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
