import json
from pathlib import Path

from ..runtime import bench
from ..output import write_atomically
from . import number, settings_from
from ..errors import SlimlmError


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SlimlmError(f"{option} expects comma-separated integers such as 1,4,16, got '{text}'") from None


def add_arguments(p):
    p.add_argument("--model", required=True, help="the compressed model: any slimlm output folder (or HF folder)")
    p.add_argument("--dense", required=True, help="its dense reference: built-in name, folder, .gguf file")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu or cuda (2:4 layers use "
                   "semi-structured kernels there)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, float16 on CUDA (the 2:4 kernels take half precision)")
    p.add_argument("--batch-sizes", help="whole-model batch sizes (sequences), e.g. 1,4")
    p.add_argument("--seqlens", help="whole-model prompt lengths, e.g. 128,512")
    p.add_argument("--layer-batches", help="input rows for the per-layer timings, e.g. 1,16,128,1024")
    p.add_argument("--decode-tokens", type=number(0), help="decode steps timed after each prefill (0: none)")
    p.add_argument("--repeats", type=number(1), help="alternating dense/compressed timings per row (median reported)")
    p.add_argument("--sparse-kernel", choices=["auto", "semi-structured", "dense"],
                   help="2:4 layers: auto = semi-structured on CUDA, dense matmul on CPU (the only option there)")
    p.add_argument("--no-layers", dest="layers", action="store_false", default=None, help="skip the per-layer rows")
    p.add_argument("--no-model", dest="whole_model", action="store_false", default=None,
                   help="skip the whole-model rows")
    p.add_argument("--include", action="append", help="regex of target layer names (replaces the default)")
    p.add_argument("--ignore", action="append", help="regex of layer names to leave out")
    p.add_argument("--seed", type=int)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG of speed-up vs batch size here")


def run(args):
    for key in ("batch_sizes", "seqlens", "layer_batches"):
        setattr(args, key, _ints(getattr(args, key), "--" + key.replace("_", "-")))
    for path in (args.json, args.plot):
        if path and not Path(path).parent.exists():  # before minutes of timing, not after
            raise SlimlmError(f"folder of {path} does not exist")
    settings = bench.resolve_settings(**settings_from(args, bench.DEFAULTS))
    result = bench.run(settings)
    print(f"{result['model']} vs dense {result['dense']} on {result['device']}")
    print(bench.format_table(result))
    print(f"peak memory: {result['memory_measure']}")
    print(f"weights in memory: dense {result['weights_bytes']['dense']:,} bytes, compressed "
          f"{result['weights_bytes']['compressed']:,} bytes")
    for line in bench.summary(result):
        print(line)
    if args.json:
        write_atomically(args.json, lambda p: p.write_text(json.dumps(result, indent=2)))
        print(f"json -> {args.json}")
    if args.plot:
        write_atomically(args.plot, lambda p: bench.plot(result, str(p)))
        print(f"plot -> {args.plot}")
