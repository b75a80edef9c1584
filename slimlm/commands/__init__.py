"""One module per `slimlm` sub-command: add_arguments(parser), run(args); its help is in cli.COMMANDS."""
import argparse
import math


def number(low: float = -math.inf, *, above: bool = False, integer: bool = True, also: tuple = ()):
    """The argparse type of a numeric option: an integer (or a float) >= low (> low with `above`), or
    one of `also` (values with a meaning of their own, like -1). The one rule for the option: a zero or
    negative count is refused here, never replaced by a default further down."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") \
                from None
        if value in also or (value > low if above else value >= low) and math.isfinite(value):
            return value
        bound = f"more than {low}" if above else f"at least {low}"
        extra = f" (or {', '.join(map(str, also))})" if also else ""
        raise argparse.ArgumentTypeError(f"must be {bound}{extra}, got {text}")
    parse.__name__ = "integer" if integer else "number"
    return parse


COUNT, WINDOW = number(1), number(2)  # how many of something; tokens in a window (one of them predicted)


def add_calibrated_job_arguments(p, solver: str, defaults: dict) -> None:
    """The options `prune` and `quantize` share: calibration windows, target layers, the OBS solver
    (`solver`: SparseGPT or GPTQ), evaluation, device and output folder. Defaults come from the job's
    DEFAULTS (stated once, there)."""
    p.add_argument("--calib", help="calibration text: .txt, .jsonl with a 'text' field, or dataset name")
    p.add_argument("--nsamples", type=COUNT, default=defaults["nsamples"], help="calibration windows")
    p.add_argument("--seqlen", type=WINDOW, help="tokens per calibration (and evaluation) window (default: 2048, "
                   "or the model's position table if shorter)")
    p.add_argument("--seed", type=int, default=defaults["seed"])
    p.add_argument("--include", action="append", help="regex of target layer names (repeatable; replaces the default "
                   "of every linear layer in the blocks)")
    p.add_argument("--ignore", action="append", help="regex of layer names to leave alone (repeatable)")
    p.add_argument("--blocksize", type=COUNT, default=defaults["blocksize"], help=f"{solver} column block size")
    p.add_argument("--percdamp", type=number(0, integer=False), default=defaults["percdamp"],
                   help=f"{solver} dampening, a fraction of the mean Hessian diagonal")
    p.add_argument("--eval", help="text to measure perplexity on afterwards")
    p.add_argument("--eval-dense", action="store_true", help="also measure the model before")
    p.add_argument("--eval-seqlen", type=WINDOW, help="evaluation window (default: --seqlen)")
    p.add_argument("--eval-windows", type=COUNT, help="evaluate at most this many windows")
    p.add_argument("--eval-bos", default=defaults["eval_bos"], choices=["auto", "window", "stream"],
                   help="BOS at the start of every evaluation window (window), only where the tokenizer put it "
                   "(stream: the SparseGPT/Wanda protocol), or window when the tokenizer adds one (auto)")
    p.add_argument("--device", default=defaults["device"], help="auto (a CUDA GPU when there is one, else the CPU), "
                   "cpu, cuda, cuda:N")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def settings_from(args, defaults: dict) -> dict:
    """The parsed options that a job's settings know (the job's resolve_settings fills in the rest)."""
    return {k: v for k, v in vars(args).items() if k in defaults}


def print_perplexities(report: dict) -> None:
    for name, ev in report["evaluation"].items():
        print(f"perplexity ({name}): {ev['perplexity']:.3f}")


def add_recipe_arguments(p, recipe_help: str) -> None:
    """The options `train` and `finetune` share: the recipe and its overrides, seed, resume, output."""
    p.add_argument("--recipe", help=recipe_help)
    p.add_argument("overrides", nargs="*", help="recipe overrides like train.steps=200 train.lr=5e-5 "
                   "(--print-config lists every key)")
    p.add_argument("--seed", type=int, help="overrides the recipe's seed")
    p.add_argument("--resume", help="continue from OUTPUT.checkpoints/checkpoint-N")
    p.add_argument("--output", help="the output folder (required unless --print-config)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe (every key, after the "
                   "overrides) as YAML and exit without loading anything; it works as a --recipe file")


def resolve_recipe(args, options: list[tuple[str, str, object]]) -> dict | None:
    """The recipe of a training command: `options` are (option, recipe key, value or None) set before the
    user's overrides; an option and an override that give one key different values are an error.
    With --print-config, prints the recipe and returns None."""
    import yaml

    from .. import recipe as recipes
    from ..errors import SlimlmError

    if not args.recipe:
        raise SlimlmError(f"--recipe is required: a YAML file or one of {', '.join(recipes.builtin_names())}")
    given = {key: (option, str(value)) for option, key, value in options if value is not None}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key in given and value != given[key][1]:
            raise SlimlmError(f"{given[key][0]} {given[key][1]} and the override {item} disagree: give one of them")
    overrides = [f"{key}={value}" for key, (_, value) in given.items()] + list(args.overrides)
    recipe = recipes.resolve(args.recipe, overrides)
    if args.print_config:
        print(yaml.safe_dump(recipe, sort_keys=False), end="")
        return None
    if not args.output:
        raise SlimlmError("--output is required: the folder to write the trained model to")
    return recipe
