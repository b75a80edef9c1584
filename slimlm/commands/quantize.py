from .. import quantize
from . import add_calibrated_job_arguments, number, print_perplexities, settings_from


def add_arguments(p):
    p.add_argument("--model", required=True, help="output folder, HF folder, built-in name or .gguf file")
    d = quantize.DEFAULTS
    p.add_argument("--bits", type=int, default=d["bits"], choices=[4, 8])
    p.add_argument("--group-size", type=number(1, also=(-1,)), default=d["group_size"], help="input columns per scale; -1: one scale per output channel")
    p.add_argument("--method", default=d["method"], choices=quantize.METHODS)
    p.add_argument("--format", default=d["format"], choices=quantize.FORMATS,
                   help="slimlm: packed 2:4 codes (quant.safetensors, slimlm.load); compressed-tensors: the vLLM "
                   "pack-quantized layout (zeros stored densely; docs/formats.md)")
    add_calibrated_job_arguments(p, "GPTQ", quantize.DEFAULTS)


def run(args):
    settings = quantize.resolve_settings(**settings_from(args, quantize.DEFAULTS))
    report = quantize.run(settings, args.output, args.overwrite)
    z = report["sizes"]
    print(f"quantized {len(report['layers'])} layers to int{settings['bits']} ({settings['method']}): target weights "
          f"{z['stored_bytes']:,} bytes (fp16 dense {z['dense_fp16_bytes']:,}) -> {args.output}")
    print_perplexities(report)
