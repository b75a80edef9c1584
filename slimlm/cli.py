"""`slimlm` command line: one sub-command per module in slimlm/commands, errors as one clear line.

The top-level help comes from the table below; a command's module (and with it torch and
transformers) is imported only when that command is chosen, so `slimlm --help` stays fast."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from .version import __version__
from .errors import SlimlmError, debug_wanted, first_line, os_failure

# name -> one-line help (the command's description too); its module is slimlm/commands/<name>.py
COMMANDS = {
    "prune": "Prune a model one-shot (magnitude, Wanda, SparseGPT) to N:M or unstructured sparsity.",
    "finetune": ("Fine-tune a model densely on a task (a classification head on JSONL {text, label} for encoders), "
                 "e.g. to make the teacher for movement pruning and LPAF."),
    "train": ("Retrain a model compressed from a YAML recipe with key=value overrides: 2:4 sparse (ast, ast-slorb, "
              "naive, gmp), movement-pruned (movement) or low-rank (lpaf)."),
    "quantize": ("Quantize the weights of a (2:4 sparse, low-rank or dense) model to int8/int4, RTN or GPTQ, keeping "
                 "its zeros exact; writes packed codes that slimlm.load rebuilds."),
    "eval": ("Measure token perplexity (SparseGPT/Wanda protocol) of a causal LM on a text, the accuracy of a "
             "classifier on JSONL {text, label}, or lm-evaluation-harness task scores (--tasks)."),
    "inspect": ("Per target layer: shape, stored weights, sparsity, 2:4 / 4:8 validity, rank and effective rank "
                "(90% energy); with --spectra, a PNG of singular-value spectra per layer type for one or more models."),
    "report": ("Compare output folders side by side on one Markdown page (method, budget, parameters, size on disk, "
               "perplexity / accuracy / lm-eval scores, tokens and time spent) with PNG plots beside it."),
    "bench": ("Latency and throughput of a compressed model (2:4, low-rank, quantized) against its dense reference: "
              "each target layer shape and the whole model (prefill, decode), over batch sizes and sequence lengths, "
              "with peak GPU memory and the weights held in memory; prints a table, writes JSON and a PNG of the "
              "speed-ups."),
    "demo": "Offline demo: evaluate smollm2-135m, prune it 2:4 with Wanda, evaluate again, save it.",
}


class _Version(argparse.Action):
    """--version: slimlm's version and those of torch and transformers, read from their package metadata
    (importing them would take seconds) only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of slimlm, torch and transformers")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        def of(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        print(f"slimlm {__version__} (torch {of('torch')}, transformers {of('transformers')})")
        parser.exit()


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in `argv` (all of them when argv is None) gets its options."""
    from importlib import import_module

    parser = argparse.ArgumentParser(prog="slimlm", description="Make language models small: prune, retrain, evaluate.")
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (as "
                        "SLIMLM_DEBUG=1 does); allowed after the command name too")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = set(COMMANDS) if argv is None else {next((a for a in argv if not a.startswith("-")), None)}
    for name, text in COMMANDS.items():
        # help= is %-formatted by argparse, description= is not
        command = sub.add_parser(name, help=text.replace("%", "%%"), description=text)
        if name in chosen:
            module = import_module(f".commands.{name.replace('eval', 'evaluate')}", __package__)
            module.add_arguments(command)
            command.set_defaults(run=module.run)
    return parser


def quiet_libraries() -> None:
    """transformers warns about long token streams (we window them ourselves) and GGUF details."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug_before = os.environ.get("SLIMLM_DEBUG")
    if "--debug" in argv:  # anywhere on the line: the flag is for the moment something goes wrong
        argv = [a for a in argv if a != "--debug"]
        os.environ["SLIMLM_DEBUG"] = "1"
    try:
        return _run(argv)
    finally:  # main() called in-process (tests, scripts) leaves the environment as it found it
        if debug_before is None:
            os.environ.pop("SLIMLM_DEBUG", None)
        else:
            os.environ["SLIMLM_DEBUG"] = debug_before


def _run(argv: list[str]) -> int:
    parser = build_parser(argv)
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
    except KeyboardInterrupt:
        print(f"slimlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line each; the traceback only when asked for
        if debug_wanted():
            traceback.print_exc()
        print(f"slimlm {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, (SlimlmError, OSError)) else 1
    finally:
        from .locks import release_all

        release_all()
    return 0


def one_line(err: Exception) -> str:
    """The message of an error: a SlimlmError's own; an OSError that escaped the readers and writers
    names its file; anything else is a slimlm bug or an input it does not explain yet, said as such."""
    if isinstance(err, SlimlmError):
        return " ".join(str(err).split("\n"))
    if isinstance(err, OSError) and err.filename:
        return str(os_failure(err))
    hint = "" if debug_wanted() else " (run again with --debug for the traceback)"
    return f"unexpected {type(err).__name__}: {first_line(err)}{hint}; please report it as a slimlm bug"
