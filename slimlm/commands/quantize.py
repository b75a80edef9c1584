from .. import quantize
from . import add_calibrated_job_arguments, print_perplexities, settings_from


def add_arguments(p):
    p.add_argument("--model", required=True, help="output folder, HF folder, built-in name or .gguf file")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale; -1: one scale per output channel")
    p.add_argument("--method", default="rtn", choices=quantize.METHODS)
    p.add_argument("--format", default="slimlm", choices=quantize.FORMATS,
                   help="slimlm: packed 2:4 codes (quant.safetensors, slimlm.load); compressed-tensors: the vLLM "
                   "pack-quantized layout (zeros stored densely; docs/formats.md)")
    add_calibrated_job_arguments(p, "GPTQ")


def run(args):
    settings = quantize.resolve_settings(**settings_from(args, quantize.DEFAULTS))
    report = quantize.run(settings, args.output, args.overwrite)
    z = report["sizes"]
    print(f"quantized {len(report['layers'])} layers to int{settings['bits']} ({settings['method']}): target weights "
          f"{z['stored_bytes']:,} bytes (fp16 dense {z['dense_fp16_bytes']:,}) -> {args.output}")
    print_perplexities(report)
