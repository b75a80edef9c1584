from ..train import job
from . import add_recipe_arguments, resolve_recipe


def add_arguments(p):
    p.add_argument("--model", required=True, help="built-in name, folder or hub id")
    p.add_argument("--data", required=True, help="training data: JSONL with 'text' and 'label' (or text for a causal LM)")
    p.add_argument("--valid", help="validation data, scored during training (accuracy or perplexity)")
    add_recipe_arguments(p, "YAML file or built-in recipe (default: finetune)")
    p.set_defaults(recipe="finetune")


def run(args):
    recipe = resolve_recipe(args, [("--model", "model", args.model), ("--data", "data.train", args.data),
                                   ("--valid", "data.valid", args.valid), ("--seed", "seed", args.seed)])
    if recipe is None:
        return
    report = job.run(recipe, args.output, args.overwrite, args.resume, command="finetune")
    if report is None:  # torchrun: rank 0 reports
        return
    final = f", final {report['validation_metric']} {report['final_val']:.4f}" if report["final_val"] is not None else ""
    print(f"fine-tuned {report['steps']} steps{final} -> {args.output}")
