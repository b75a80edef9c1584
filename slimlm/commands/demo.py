"""The main job end to end, offline: dense -> Wanda 2:4 -> evaluate -> output folder."""
from .. import oneshot


def add_arguments(p):
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="slimlm-demo")
    p.add_argument("--overwrite", action="store_true")


def run(args):
    settings = oneshot.resolve_settings(
        model=args.model, method=args.method, sparsity=args.sparsity, calib="python-docs:train",
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval="python-docs:test",
        eval_dense=True, eval_windows=args.eval_windows)
    print(f"slimlm demo: {args.model}, {args.method} {args.sparsity}, calibration and evaluation on the "
          "Python documentation bundled with CPython (pydoc_data)")
    report = oneshot.run(settings, args.output, args.overwrite)
    dense, pruned = report["evaluation"]["dense"], report["evaluation"]["pruned"]
    t = report["totals"]
    rows = [("dense", dense["perplexity"], 0.0), (f"{args.method} {args.sparsity}", pruned["perplexity"], t["target_sparsity"])]
    print(f"\n{'model':<16} {'perplexity':>10} {'sparsity':>9}")
    for name, ppl, sp in rows:
        print(f"{name:<16} {ppl:>10.2f} {sp:>9.1%}")
    print(f"\n{pruned['windows']} windows x {pruned['seqlen']} tokens; pruning took {report['prune_seconds']:.0f}s")
    print(f"saved to {args.output} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
