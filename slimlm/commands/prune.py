from .. import pruning
from . import COUNT, add_calibrated_job_arguments, number, print_perplexities, settings_from
from ..prune import METHODS


def add_arguments(p):
    p.add_argument("--model", required=True, help="built-in name (smollm2-135m, minilm-l6), HF folder, .gguf file or hub id")
    p.add_argument("--method", default=pruning.DEFAULTS["method"], choices=METHODS)
    p.add_argument("--sparsity", default=pruning.DEFAULTS["sparsity"], help="N:M (2:4, 4:8) or a fraction of pruned weights (0.5)")
    p.add_argument("--skip-indivisible", action="store_true", help="leave layers whose input width is not divisible by M dense (they are reported)")
    p.add_argument("--dtype", default=pruning.DEFAULTS["dtype"], choices=["float32", "bfloat16", "float16"])
    add_calibrated_job_arguments(p, "SparseGPT", pruning.DEFAULTS)
    d = pruning.DEFAULTS
    r = p.add_argument_group("block-wise reconstruction", "after the one-shot prune, train each block to reproduce "
                             "the dense model's outputs on the calibration windows (resumable per block)")
    r.add_argument("--reconstruct", action="store_true", help="turn it on")
    r.add_argument("--reconstruct-steps", type=COUNT, default=d["reconstruct_steps"], help="optimizer steps per block")
    r.add_argument("--reconstruct-batch", type=COUNT, default=d["reconstruct_batch"], help="calibration windows per step")
    r.add_argument("--reconstruct-lr", type=number(0, above=True, integer=False), default=d["reconstruct_lr"])
    r.add_argument("--reconstruct-mask", default=d["reconstruct_mask"], choices=["fixed", "adaptive"],
                   help="fixed: the one-shot mask; adaptive: AST's N:M refresh with decay of pruned weights")
    r.add_argument("--reconstruct-target", default=d["reconstruct_target"], choices=["dense", "local"],
                   help="dense: the dense model's activations (corrects earlier blocks' errors); local: the dense "
                   "block on the compressed inputs")


def run(args):
    settings = pruning.resolve_settings(**settings_from(args, pruning.DEFAULTS))
    report = pruning.run(settings, args.output, args.overwrite)
    t = report["totals"]
    print(f"pruned {t['target_layers']} layers with {report['method']} to {report['sparsity']} "
          f"({t['target_sparsity']:.1%} zeros) in {report['prune_seconds']:.1f}s -> {args.output}")
    print_perplexities(report)
