"""`slimlm` command line: one sub-command per module in slimlm/commands, errors as one clear line."""
from __future__ import annotations

import argparse
import sys
import warnings

from .errors import SlimlmError

COMMANDS = ("prune", "finetune", "train", "quantize", "eval", "inspect", "report", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    parser = argparse.ArgumentParser(prog="slimlm", description="Make language models small: prune, retrain, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = import_module(f".commands.{name.replace('eval', 'evaluate')}", __package__)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def quiet_libraries() -> None:
    """transformers warns about long token streams (we window them ourselves) and GGUF details."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # recipe overrides (key=value) may come after the options too: `train --recipe ast --output D steps=5`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # warnings as one line each, like errors (no source line, no file path)
    warnings.formatwarning = lambda message, category, *_, **__: f"slimlm {args.command}: warning: {message}\n"
    try:
        quiet_libraries()
        args.run(args)
    except SlimlmError as err:
        print(f"slimlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
