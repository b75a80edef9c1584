"""The main job end to end, offline: dense -> one-shot 2:4 (Wanda) -> the same with block-wise
reconstruction -> evaluate each -> the best model in the output folder."""
from .. import pruning
from . import number


def add_arguments(p):
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--nsamples", type=number(1), default=32)
    p.add_argument("--seqlen", type=number(2), default=512)
    p.add_argument("--reconstruct-steps", type=number(0), default=8, help="reconstruction steps per block (0: skip it)")
    p.add_argument("--eval-windows", type=number(1), default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="slimlm-demo")
    p.add_argument("--overwrite", action="store_true")


def run(args):
    common = dict(model=args.model, method=args.method, sparsity=args.sparsity, calib="python-docs:train",
                  nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval="python-docs:test",
                  eval_windows=args.eval_windows)
    print(f"slimlm demo: {args.model}, {args.method} {args.sparsity}, calibration and evaluation on the "
          "Python documentation bundled with CPython (pydoc_data)")
    reconstruct = args.reconstruct_steps > 0
    # the folder written last measures the dense model too, so its report holds both numbers
    one_shot = pruning.run(pruning.resolve_settings(**common, eval_dense=not reconstruct),
                           None if reconstruct else args.output, args.overwrite)
    rebuilt = None
    if reconstruct:  # the one-shot mask, then every block trained to give back the dense outputs
        rebuilt = pruning.run(pruning.resolve_settings(**common, eval_dense=True, reconstruct=True,
                                                       reconstruct_steps=args.reconstruct_steps,
                                                       reconstruct_batch=min(4, args.nsamples)),
                              args.output, args.overwrite)
    dense, pruned = (rebuilt or one_shot)["evaluation"]["dense"], one_shot["evaluation"]["pruned"]
    rows = [("dense", dense["perplexity"], 0.0, None),
            (f"{args.method} {args.sparsity}", pruned["perplexity"], one_shot["totals"]["target_sparsity"],
             one_shot["prune_seconds"])]
    if rebuilt:
        rows.append(("+ reconstruction", rebuilt["evaluation"]["pruned"]["perplexity"],
                     rebuilt["totals"]["target_sparsity"], rebuilt["prune_seconds"]))
    print(f"\n{'model':<18} {'perplexity':>10} {'sparsity':>9} {'time':>7}")
    for name, ppl, sp, seconds in rows:
        print(f"{name:<18} {ppl:>10.2f} {sp:>9.1%} {'' if seconds is None else f'{seconds:.0f}s':>7}")
    print(f"\n{pruned['windows']} windows x {pruned['seqlen']} tokens of held-out text (lower is better)")
    print(f"saved the {'reconstructed' if reconstruct else 'one-shot'} model to {args.output} "
          "(loads with transformers.AutoModelForCausalLM.from_pretrained)")
