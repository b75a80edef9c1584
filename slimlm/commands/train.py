from .. import recipe as recipes
from ..train import job
from . import add_recipe_arguments, resolve_recipe


def add_arguments(p):
    add_recipe_arguments(p, f"YAML file or built-in: {', '.join(recipes.builtin_names())} "
                         "(--list-recipes describes them)")
    p.add_argument("--model", help="the model to compress, the same as the override model=...: built-in name, "
                   "folder, .gguf file or hub id (default: the recipe's)")
    p.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")


def run(args):
    if args.list_recipes:
        for name in recipes.builtin_names():
            print(f"{name:<10} {recipes.summary(name)}")
        return
    recipe = resolve_recipe(args, [("--model", "model", args.model), ("--seed", "seed", args.seed)])
    if recipe is None:
        return
    report = job.run(recipe, args.output, args.overwrite, args.resume)
    if report is None:  # torchrun: rank 0 reports
        return
    final = f", final {report['validation_metric']} {report['final_val']:.4f}" if report["final_val"] is not None else ""
    print(f"trained {report['steps']} steps ({report['tokens_seen']:,} tokens){final} -> {args.output}")
