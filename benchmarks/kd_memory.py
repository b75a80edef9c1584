"""Peak memory and time of one AST training step with distillation, full logits against chunked (issue 19).

Each measurement is a fresh process: the real Trainer with the AST method (magnitude start, 2:4 masks,
decay, dense teacher copy, bf16 autocast where the CPU has it), one warm-up step, then the peak resident
memory (VmHWM, reset through /proc/self/clear_refs after the warm-up) and the wall time of the next
steps. Runs alternate full / chunked per repeat, so a noisy shared machine slows both alike. A
process is capped at --limit-gb of address space: a step that does not fit is reported as such.

Models: smollm2-135m (vocabulary 49,152) and a tiny random LLaMA with a 262,144 vocabulary
(hidden 256, 2 layers, tied embeddings), where the logits dominate.

    python benchmarks/kd_memory.py                      # peak memory (docs/benchmarks.md)
    python benchmarks/kd_memory.py --threads 1 --repeats 2 --steps 2 \
        --configs smollm2-135m:256:2 llama-262k:256:2 --out benchmarks/results/kd_step_time.json   # step time
    python benchmarks/kd_memory.py --one smollm2-135m 256 2 256   # one measurement (a child process)
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LARGE_VOCAB = "llama-262k"


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GB
    raise KeyError(field)


def _model(name: str):
    if name == LARGE_VOCAB:
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=262_144, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                          tie_word_embeddings=True)
        return transformers.AutoModelForCausalLM.from_config(config), 262_144
    from slimlm import models

    model = models.load(name).model
    return model, model.config.vocab_size


def one(name: str, seqlen: int, batch: int, chunk: int, steps: int, limit_gb: float, threads: int = 0) -> dict:
    """One measurement in this process (the child)."""
    from slimlm import recipe
    from slimlm.data import TokenStream
    from slimlm.methods.ast import SparseTraining
    from slimlm.train.engine import Trainer

    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), resource.RLIM_INFINITY))
    if threads:
        torch.set_num_threads(threads)
    model, vocab = _model(name)
    rec = recipe.resolve("ast", [f"data.seqlen={seqlen}", f"train.batch_size={batch}", f"train.steps={steps + 1}",
                                 "method.init=magnitude", "method.mask_score=magnitude",
                                 f"method.distill.chunk_tokens={chunk}", "train.eval_every=1000", "train.save_every=1000"])
    tokens = torch.randint(0, vocab, (seqlen * batch * (steps + 2),), generator=torch.Generator().manual_seed(0))
    stream = TokenStream(ids=tokens, source="random tokens", bos_added=False)
    trainer = Trainer(model, SparseTraining(rec, None), rec, stream, None, Path(tempfile.mkdtemp()))
    result = {"model": name, "vocab": vocab, "seqlen": seqlen, "batch": batch, "chunk_tokens": chunk,
              "bf16": trainer.bf16, "threads": torch.get_num_threads()}
    try:
        trainer.train(until=1)  # warm-up: optimizer state, the head check
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
        result["rss_before_gb"] = _status("VmRSS")
        start = time.perf_counter()
        history = trainer.train(until=1 + steps)
        result["step_seconds"] = (time.perf_counter() - start) / steps
        result["peak_gb"] = _status("VmHWM")
        result["loss"] = history[-1]["loss"]
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        result["peak_gb"] = None
        result["error"] = f"out of memory under a {limit_gb:g} GB cap"
    return result


def measure(name, seqlen, batch, chunk, steps, limit_gb, threads) -> dict:
    cmd = [sys.executable, __file__, "--one", name, str(seqlen), str(batch), str(chunk),
           "--steps", str(steps), "--limit-gb", str(limit_gb), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"model": name, "seqlen": seqlen, "batch": batch, "chunk_tokens": chunk, "peak_gb": None,
                "error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=4, metavar=("MODEL", "SEQLEN", "BATCH", "CHUNK"))
    ap.add_argument("--configs", nargs="+", default=["smollm2-135m:256:2", "smollm2-135m:1024:2",
                                                     f"{LARGE_VOCAB}:256:2", f"{LARGE_VOCAB}:1024:2"],
                    help="MODEL:SEQLEN:BATCH")
    ap.add_argument("--chunks", nargs="+", type=int, default=[0, 256], help="0 = the full path (before)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per process")
    ap.add_argument("--limit-gb", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default); "
                    "1 steadies the step times on a shared machine")
    ap.add_argument("--out", default="benchmarks/results/kd_memory.json")
    args = ap.parse_args()
    if args.one:
        name, seqlen, batch, chunk = args.one
        print(json.dumps(one(name, int(seqlen), int(batch), int(chunk), args.steps, args.limit_gb, args.threads)))
        return
    runs = []
    for config in args.configs:
        name, seqlen, batch = config.split(":")
        for rep in range(args.repeats):
            for chunk in args.chunks:  # alternating: full, chunked, full, chunked, ...
                r = measure(name, int(seqlen), int(batch), chunk, args.steps, args.limit_gb, args.threads)
                print(json.dumps(r), flush=True)
                runs.append(r)
    table = {}
    for r in runs:
        key = f"{r['model']} {r['seqlen']}x{r['batch']} chunk={r['chunk_tokens']}"
        table.setdefault(key, []).append(r)
    summary = {k: {"peak_gb": max((r["peak_gb"] for r in v if r["peak_gb"]), default=None),
                   "step_seconds": statistics.median([r["step_seconds"] for r in v if r.get("step_seconds")] or [0]) or None,
                   "error": next((r["error"] for r in v if "error" in r), None)} for k, v in table.items()}
    result = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores (shared), CPU torch",
              "torch": torch.__version__, "limit_gb": args.limit_gb, "threads": args.threads or "default", "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
