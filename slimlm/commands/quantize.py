from .. import quantize

HELP = ("Quantize the weights of a (2:4 sparse, low-rank or dense) model to int8/int4, RTN or GPTQ, keeping "
        "its zeros exact; writes packed codes that slimlm.load rebuilds.")


def add_arguments(p):
    p.add_argument("--model", required=True, help="output folder, HF folder, built-in name or .gguf file")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale; -1: one scale per output channel")
    p.add_argument("--method", default="rtn", choices=quantize.METHODS)
    p.add_argument("--calib", help="calibration text for GPTQ (.txt, .jsonl or dataset name)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", action="append", help="regex of layer names (replaces the default)")
    p.add_argument("--ignore", action="append", help="regex of layer names to leave in float")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening, a fraction of the mean Hessian diagonal")
    p.add_argument("--blocksize", type=int, default=128, help="GPTQ column block size")
    p.add_argument("--eval", help="text to measure perplexity on, with the quantized weights")
    p.add_argument("--eval-dense", action="store_true", help="also measure the model before quantization")
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--eval-windows", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args):
    settings = quantize.resolve_settings(**{k: v for k, v in vars(args).items() if k in quantize.DEFAULTS})
    report = quantize.run(settings, args.output, args.overwrite)
    z = report["sizes"]
    print(f"quantized {len(report['layers'])} layers to int{settings['bits']} ({settings['method']}): target weights "
          f"{z['stored_bytes']:,} bytes (fp16 dense {z['dense_fp16_bytes']:,}) -> {args.output}")
    for name, ev in report["evaluation"].items():
        print(f"perplexity ({name}): {ev['perplexity']:.3f}")
