"""Peak memory and throughput of the training-data path (issue 18): a generated JSONL corpus of the
given sizes (the sotu training addresses, one per line, repeated), tokenized into the token cache with
EOS between documents, then opened again from the cache.

Each measurement is a fresh process: peak resident memory (VmHWM, reset through /proc/self/clear_refs
after the tokenizer is loaded, so loading it does not count) minus the resident memory at that point is
the data path's own share; getrusage's whole-process peak is recorded too: `first` builds the cache entry, `cached`
opens it and cuts the first training batch. For comparison, `old` tokenizes the whole text in one
tokenizer call, as slimlm did before issue 18 (smaller sizes only: it holds everything in memory).

    nice -n 10 python benchmarks/data.py --sizes-mb 50 500 --old-mb 10 --out benchmarks/results/data.json
    python benchmarks/data.py --one first CORPUS CACHE MODEL   # one measurement (a child process)
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "sotu" / "train.txt"


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def one(kind: str, corpus: str, cache: str, model: str) -> dict:
    """One measurement in this process; prints its JSON."""
    from slimlm import data, models
    from slimlm.train.datasets import Windows

    tokenizer = models.load_tokenizer(model)
    base = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts here: loading the tokenizer is not data
    start = time.perf_counter()
    if kind == "old":
        text = data.read_text(corpus)
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
        tokens = ids.numel()
    else:
        stream = data.load_tokens(tokenizer, corpus, split="train", separator="eos", cache_dir=cache)
        windows = Windows(stream, 2048)
        windows.get([len(windows) - 1, 0])  # the first batch: pages of the memory map are read
        tokens = len(stream)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    return {"kind": kind, "seconds": seconds, "tokens": tokens, "peak_rss_mb": peak, "rss_after_tokenizer_mb": base,
            "data_path_mb": peak - base, "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def make_corpus(path: Path, megabytes: int) -> int:
    """JSONL of the sotu addresses (one per line of train.txt), repeated to `megabytes`."""
    lines = [json.dumps({"text": line}) + "\n" for line in SOURCE.read_text().splitlines() if line.strip()]
    block = "".join(lines).encode()
    target = megabytes * 2**20
    with open(path, "wb") as f:
        written = 0
        while written < target:
            chunk = block[: target - written]
            f.write(chunk[: chunk.rfind(b"\n") + 1] if written + len(block) > target else chunk)
            written += len(block)
    return path.stat().st_size


def measure(kind: str, corpus: Path, cache: Path, model: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", kind, str(corpus), str(cache), model],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--old-mb", type=int, nargs="*", default=[10])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workdir", default=None, help="where the corpus and cache go (default: a temporary folder)")
    ap.add_argument("--out", default="benchmarks/results/data.json")
    ap.add_argument("--one", nargs=4, metavar=("KIND", "CORPUS", "CACHE", "MODEL"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="slimlm-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for mb in args.old_mb:
            corpus = work / f"corpus-{mb}mb.jsonl"
            size = make_corpus(corpus, mb)
            rows.append({"corpus_mb": size / 2**20, **measure("old", corpus, work / "unused", args.model)})
            print(rows[-1], flush=True)
        for mb in args.sizes_mb:
            corpus, cache = work / f"corpus-{mb}mb.jsonl", work / f"cache-{mb}"
            size = make_corpus(corpus, mb)
            for kind in ("first", "cached"):
                rows.append({"corpus_mb": size / 2**20, **measure(kind, corpus, cache, args.model)})
                row = rows[-1]
                row["mb_per_s"] = row["corpus_mb"] / row["seconds"]
                row["tokens_per_s"] = row["tokens"] / row["seconds"]
                print(row, flush=True)
            corpus.unlink()
            shutil.rmtree(cache)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
              "model": args.model, "source": str(SOURCE.relative_to(ROOT.parent)), "separator": "eos", "rows": rows,
              "command": " ".join(["python", *sys.argv])}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
