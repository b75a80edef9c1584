import json

from .. import models
from ..output import write_atomically
from ..errors import SlimlmError
from ..eval.layers import format_table, layer_stats, totals
from ..eval.spectra import energy_curves, plot_spectra


def add_arguments(p):
    p.add_argument("model", nargs="+", help="output folder, HF folder, built-in name or .gguf file (several "
                   "to compare their spectra)")
    p.add_argument("--include", action="append", help="regex of layer names (replaces the default)")
    p.add_argument("--ignore", action="append", help="regex of layer names to leave out")
    p.add_argument("--json", help="write the layers and totals to this file")
    p.add_argument("--spectra", help="write a PNG of the cumulative singular-value energy per layer type")
    p.add_argument("--labels", help="comma-separated legend labels for the models (default: their paths)")


def run(args):
    labels = args.labels.split(",") if args.labels else args.model
    if len(labels) != len(args.model):
        raise SlimlmError(f"--labels has {len(labels)} names for {len(args.model)} models")
    results, curves = [], {}
    for spec, label in zip(args.model, labels):
        loaded = models.load(spec)
        targets = models.find_targets(loaded.model, args.include, args.ignore)
        rows = layer_stats(targets, ranks=True, progress=True)
        total = totals(loaded.model, targets)
        print(f"== {spec}\n{format_table(rows)}")
        print(f"\ntarget layers: {total['target_layers']}, {total['target_parameters']:,} weights as dense matrices, "
              f"{total['target_nonzero']:,} stored (non-zeros or factors, {1 - total['target_sparsity']:.1%}); "
              f"whole model {total['model_parameters']:,} parameters, {total['model_nonzero']:,} non-zero\n")
        results.append({"model": spec, "layers": rows, "totals": total})
        if args.spectra:
            curves[label] = energy_curves(targets)
    if args.spectra:
        write_atomically(args.spectra, lambda path: plot_spectra(curves, str(path)))
        print(f"spectra -> {args.spectra}")
    if args.json:
        text = json.dumps(results[0] if len(results) == 1 else results, indent=2)
        write_atomically(args.json, lambda path: path.write_text(text))
