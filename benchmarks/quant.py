"""Quantization benchmark (issue 6): perplexity of smollm2-135m 2:4 at fp32, int8 and int4 with RTN and
GPTQ, and real file sizes on disk.

The 2:4 model is the AST output of the issue-3 benchmark (runs/bench-ast-wanda/ast) when it exists;
otherwise it is made here with SparseGPT one-shot (`slimlm prune`, same calibration as below).
Every quantized model is written with `slimlm quantize` (in-process, the same job) and evaluated
dequantized. Budgets are small so that it finishes on 2 shared CPU cores: calibration 32 windows of
1024 tokens of sotu/train.txt, perplexity on the first 16 windows of 1024 tokens of sotu/test.txt.

    PYTHONPATH=. python benchmarks/quant.py --data ../shared/data/sotu --out benchmarks/results/quant

Rows are appended to OUT.json as they finish (a rerun skips rows already there); --jobs picks the
quantizations and their order. The CPU speed ratios come from `slimlm bench` (benchmarks/speed.sh).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimlm import data, models, quantize
from slimlm.formats.quantized import FILENAME
from slimlm.ops import quant
from slimlm.eval.perplexity import perplexity

AST_RUN = "runs/bench-ast-wanda/ast"


def sparse_model(args) -> str:
    if Path(args.sparse).is_dir():
        return args.sparse
    folder = f"{args.runs}/sparsegpt-2of4"
    if not Path(folder).is_dir():
        subprocess.run([sys.executable, "-m", "slimlm", "prune", "--model", args.model, "--method", "sparsegpt",
                        "--sparsity", "2:4", "--calib", f"{args.data}/train.txt", "--nsamples", str(args.nsamples),
                        "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--output", folder], check=True)
    return folder


def file_bytes(tensors: dict) -> int:
    """Size of a real safetensors file holding these tensors (header included)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return os.path.getsize(path)


def sizes(dense_spec: str, sparse_spec: str, quantized: dict[int, str]) -> list[dict]:
    """Whole-model files with everything that is not a target weight in fp16 (embeddings, norms), so
    the rows differ only in how the target weights are stored. Tied weights are stored once."""
    rows = []
    dense = models.load(dense_spec).model
    rows.append({"storage": "dense fp16", "bytes": file_bytes({n: p.half() for n, p in dense.named_parameters()})})
    del dense
    sparse = models.load(sparse_spec).model
    targets = models.find_targets(sparse)
    rest = {n: p.half() for n, p in sparse.named_parameters() if n.removesuffix(".weight") not in targets}
    rows.append({"storage": "2:4 fp16, zeros stored densely (stock checkpoint)",
                 "bytes": file_bytes({n: p.half() for n, p in sparse.named_parameters()})})
    packed = dict(rest)
    for name, module in targets.items():
        W = models.weight_matrix(module).detach()
        # positions of the 2 kept slots per group: pack the mask as 0/1 codes (same slot rule as the codes)
        slots = quant.pack_24((W != 0).to(torch.int8), 8)
        packed[f"{name}.positions"] = slots["positions"]
        idx = quant.unpack_24({"values": torch.ones(W.shape[0], W.shape[1] // 2, dtype=torch.int8),
                               "positions": slots["positions"]}, tuple(W.shape)) != 0
        packed[f"{name}.values"] = W[idx].reshape(W.shape[0], -1).half()
    rows.append({"storage": "2:4 fp16 packed (values + 2-bit positions)", "bytes": file_bytes(packed)})
    rest_bytes = file_bytes(rest)
    for bits, folder in sorted(quantized.items(), reverse=True):
        q = os.path.getsize(os.path.join(folder, FILENAME))
        rows.append({"storage": f"2:4 + int{bits} packed (quant.safetensors from {folder})", "bytes": rest_bytes + q,
                     "target_file_bytes": q})
    for row in rows:
        row["rest_fp16_bytes"] = rest_bytes
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="the dense reference")
    ap.add_argument("--sparse", default=AST_RUN, help="2:4 model folder (else SparseGPT is run)")
    ap.add_argument("--data", default="../shared/data/sotu")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64, help="64 divides every SmolLM2 width (576, 1536); 128 does not")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", default="8:rtn,4:rtn,4:gptq,8:gptq", help="bits:method, in this order")
    ap.add_argument("--runs", default="runs/bench-quant")
    ap.add_argument("--out", default="benchmarks/results/quant")
    args = ap.parse_args()
    os.makedirs(args.runs, exist_ok=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result_path = args.out + ".json"
    result = json.load(open(result_path)) if os.path.exists(result_path) else {"rows": []}
    done = {(r["model"], r["bits"], r["method"]) for r in result["rows"]}

    def save():
        with open(result_path, "w") as f:
            json.dump(result, f, indent=2)

    sparse = sparse_model(args)
    test_file = f"{args.data}/test.txt"
    result["meta"] = {
        "command": "python benchmarks/quant.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "sparse_model": sparse,
        "protocol": {"calibration": f"{args.nsamples} x {args.seqlen} tokens of train.txt, seed {args.seed}",
                     "test": f"first {args.eval_windows} windows of {args.seqlen} tokens of {test_file}",
                     "group_size": args.group_size}}

    for spec, label in ((args.model, "dense"), (sparse, "2:4")):
        if (label, "fp32", "-") in done:
            continue
        loaded = models.load(spec)
        stream = data.load_tokens(loaded.tokenizer, test_file)
        start = time.perf_counter()
        ppl = perplexity(loaded.model, stream, args.seqlen, max_windows=args.eval_windows)
        result["rows"].append({"model": label, "bits": "fp32", "method": "-", **ppl,
                               "seconds": time.perf_counter() - start})
        print(result["rows"][-1], flush=True)
        save()

    quantized = {}
    for job in args.jobs.split(","):
        bits, method = int(job.split(":")[0]), job.split(":")[1]
        folder = f"{args.runs}/2of4-int{bits}-{method}"
        if ("2:4", bits, method) not in done:
            settings = quantize.resolve_settings(
                model=sparse, bits=bits, group_size=args.group_size, method=method, calib=f"{args.data}/train.txt",
                nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval=test_file,
                eval_windows=args.eval_windows)
            report = quantize.run(settings, folder, overwrite=True)
            result["rows"].append({"model": "2:4", "bits": bits, "method": method, **report["evaluation"]["quantized"],
                                   "quantize_seconds": report["seconds"], "target_sizes": report["sizes"],
                                   "folder": folder})
            print({k: v for k, v in result["rows"][-1].items() if k != "target_sizes"}, flush=True)
            save()
        quantized.setdefault(bits, folder)  # the file size does not depend on the method
        if "sizes" not in result and {4, 8} <= set(quantized):
            result["sizes"] = sizes(args.model, sparse, quantized)
            save()
        write_tables(result, args.out)


def write_tables(result: dict, out: str) -> None:
    lines = ["| model | weights | method | perplexity |", "| --- | --- | --- | ---: |"]
    lines += [f"| {r['model']} | {r['bits'] if r['bits'] == 'fp32' else 'int' + str(r['bits'])} | {r['method']} | "
              f"{r['perplexity']:.2f} |" for r in result["rows"]]
    lines += ["", "| storage | bytes on disk | MB |", "| --- | ---: | ---: |"]
    lines += [f"| {s['storage']} | {s['bytes']:,} | {s['bytes'] / 1e6:.1f} |" for s in result.get("sizes", [])]
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
