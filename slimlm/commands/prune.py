from .. import oneshot
from . import add_calibrated_job_arguments, print_perplexities, settings_from
from ..prune import METHODS


def add_arguments(p):
    p.add_argument("--model", required=True, help="built-in name (smollm2-135m, minilm-l6), HF folder, .gguf file or hub id")
    p.add_argument("--method", default=oneshot.DEFAULTS["method"], choices=METHODS)
    p.add_argument("--sparsity", default=oneshot.DEFAULTS["sparsity"], help="N:M (2:4, 4:8) or a fraction of pruned weights (0.5)")
    p.add_argument("--skip-indivisible", action="store_true", help="leave layers whose input width is not divisible by M dense (they are reported)")
    p.add_argument("--dtype", default=oneshot.DEFAULTS["dtype"], choices=["float32", "bfloat16", "float16"])
    add_calibrated_job_arguments(p, "SparseGPT", oneshot.DEFAULTS)


def run(args):
    settings = oneshot.resolve_settings(**settings_from(args, oneshot.DEFAULTS))
    report = oneshot.run(settings, args.output, args.overwrite)
    t = report["totals"]
    print(f"pruned {t['target_layers']} layers with {report['method']} to {report['sparsity']} "
          f"({t['target_sparsity']:.1%} zeros) in {report['prune_seconds']:.1f}s -> {args.output}")
    print_perplexities(report)
