import json

from .. import models
from ..inspect import format_table, layer_stats, totals

HELP = "Per target layer: shape, sparsity, 2:4 / 4:8 validity, rank and effective rank (90% energy)."


def add_arguments(p):
    p.add_argument("model", help="output folder, HF folder, built-in name or .gguf file")
    p.add_argument("--include", action="append", help="regex of layer names (replaces the default)")
    p.add_argument("--ignore", action="append", help="regex of layer names to leave out")
    p.add_argument("--json", help="write the layers and totals to this file")


def run(args):
    loaded = models.load(args.model)
    targets = models.find_targets(loaded.model, args.include, args.ignore)
    rows = layer_stats(targets, ranks=True, progress=True)
    total = totals(loaded.model, targets)
    print(format_table(rows))
    print(f"\ntarget layers: {total['target_layers']}, parameters {total['target_parameters']:,}, "
          f"non-zero {total['target_nonzero']:,} (sparsity {total['target_sparsity']:.1%}); "
          f"whole model {total['model_parameters']:,} parameters, {total['model_nonzero']:,} non-zero")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "layers": rows, "totals": total}, f, indent=2)
