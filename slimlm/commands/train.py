from .. import recipe as recipes
from ..train import job

HELP = ("Retrain a model compressed from a YAML recipe with key=value overrides: 2:4 sparse (ast, ast-slorb, "
        "naive, gmp), movement-pruned (movement) or low-rank (lpaf).")


def add_arguments(p):
    p.add_argument("--recipe", required=True, help=f"YAML file or built-in: {', '.join(recipes.builtin_names())}")
    p.add_argument("overrides", nargs="*", help="recipe overrides like train.steps=200 method.sparsity=4:8")
    p.add_argument("--seed", type=int, help="overrides the recipe's seed")
    p.add_argument("--resume", help="continue from OUTPUT.checkpoints/checkpoint-N")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args):
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    recipe = recipes.resolve(args.recipe, overrides)
    report = job.run(recipe, args.output, args.overwrite, args.resume)
    if report is None:  # torchrun: rank 0 reports
        return
    final = f", final {report['validation_metric']} {report['final_val']:.4f}" if report["final_val"] is not None else ""
    print(f"trained {report['steps']} steps ({report['tokens_seen']:,} tokens){final} -> {args.output}")
