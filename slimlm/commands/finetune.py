from .. import recipe as recipes
from ..train import job

HELP = ("Fine-tune a model densely on a task (a classification head on JSONL {text, label} for encoders), "
        "e.g. to make the teacher for movement pruning and LPAF.")


def add_arguments(p):
    p.add_argument("--model", required=True, help="built-in name, folder or hub id")
    p.add_argument("--data", required=True, help="training data: JSONL with 'text' and 'label' (or text for a causal LM)")
    p.add_argument("--valid", help="validation data, scored during training (accuracy or perplexity)")
    p.add_argument("--recipe", default="finetune", help="YAML file or built-in recipe (default: finetune)")
    p.add_argument("overrides", nargs="*", help="recipe overrides like train.steps=300 train.lr=5e-5")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="continue from OUTPUT.checkpoints/checkpoint-N")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args):
    overrides = [f"model={args.model}", f"data.train={args.data}"] + ([f"data.valid={args.valid}"] if args.valid else [])
    overrides += list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    recipe = recipes.resolve(args.recipe, overrides)
    report = job.run(recipe, args.output, args.overwrite, args.resume)
    if report is None:  # torchrun: rank 0 reports
        return
    final = f", final {report['validation_metric']} {report['final_val']:.4f}" if report["final_val"] is not None else ""
    print(f"fine-tuned {report['steps']} steps{final} -> {args.output}")
