from .. import oneshot
from ..prune import METHODS

HELP = "Prune a model one-shot (magnitude, Wanda, SparseGPT) to N:M or unstructured sparsity."


def add_arguments(p):
    p.add_argument("--model", required=True, help="built-in name (smollm2-135m, minilm-l6), HF folder, .gguf file or hub id")
    p.add_argument("--method", default="wanda", choices=METHODS)
    p.add_argument("--sparsity", default="2:4", help="N:M (2:4, 4:8) or a fraction of pruned weights (0.5)")
    p.add_argument("--calib", help="calibration text: .txt, .jsonl with a 'text' field, or dataset name")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration (and evaluation) window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", action="append", help="regex of layer names to prune (repeatable; replaces the default of every linear layer in the blocks)")
    p.add_argument("--ignore", action="append", help="regex of layer names to leave dense (repeatable)")
    p.add_argument("--skip-indivisible", action="store_true", help="leave layers whose input width is not divisible by M dense (they are reported)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening, a fraction of the mean Hessian diagonal")
    p.add_argument("--eval", help="text to measure perplexity on after pruning")
    p.add_argument("--eval-dense", action="store_true", help="also measure the dense model first")
    p.add_argument("--eval-seqlen", type=int, help="evaluation window (default: --seqlen)")
    p.add_argument("--eval-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args):
    keys = set(oneshot.DEFAULTS)
    settings = oneshot.resolve_settings(**{k: v for k, v in vars(args).items() if k in keys})
    report = oneshot.run(settings, args.output, args.overwrite)
    t = report["totals"]
    print(f"pruned {t['target_layers']} layers with {report['method']} to {report['sparsity']} "
          f"({t['target_sparsity']:.1%} zeros) in {report['prune_seconds']:.1f}s -> {args.output}")
    for name, ev in report["evaluation"].items():
        print(f"perplexity ({name}): {ev['perplexity']:.3f}")
