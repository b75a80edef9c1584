import argparse
import json
from pathlib import Path

from .. import data, devices, models, output
from ..errors import SlimlmError
from ..eval.perplexity import accuracy, perplexity
from . import COUNT, WINDOW, number


def add_arguments(p):
    p.add_argument("--model", required=True)
    p.add_argument("--data", help=".txt, .jsonl with a 'text' field, or dataset name; "
                   "for a classifier, .jsonl with 'text' and 'label'")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (boolq,rte,hellaswag,...; groups, "
                   "tags or task YAML files too); needs pip install 'slimlm[eval]'")
    p.add_argument("--include-path", action="append", help="folder of custom lm-eval task YAML (repeatable); "
                   "its tasks can run Python code: give only folders you trust")
    p.add_argument("--limit", type=number(0, above=True, integer=False), help="tasks: at most this many examples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=number(0), help="tasks: examples in the prompt (default: the task's own, else 0)")
    p.add_argument("--seed", type=int, default=0, help="tasks: seed for few-shot sampling")
    p.add_argument("--output-path", help="tasks: folder for lm-eval's own results file (and per-sample logs), "
                   "written as lm-eval's CLI writes them: DIR/<model>/results_<date>.json")
    p.add_argument("--log-samples", action="store_true", help="tasks: also write each example's prompt, "
                   "responses and scores to DIR/<model>/samples_<task>_<date>.jsonl (needs --output-path)")
    p.add_argument("--no-report", action="store_true", help="do not merge the results into the model folder's "
                   "report.json (and, for tasks, its model card)")
    p.add_argument("--max-length", type=WINDOW, default=128, help="classifier: tokens per example")
    p.add_argument("--seqlen", type=WINDOW, help="perplexity window; for tasks, the longest input (longer ones lose "
                   "tokens from the left). Default: 2048, or the model's position table if shorter")
    p.add_argument("--max-windows", type=COUNT, help="evaluate at most this many windows")
    p.add_argument("--bos", default="auto", choices=["auto", "window", "stream"],
                   help="perplexity: BOS at the start of every window (window), only where the tokenizer put it "
                   "(stream: the SparseGPT/Wanda protocol), or window when the tokenizer adds one (auto)")
    p.add_argument("--batch-size", type=_batch_size, help="default: 1 window (perplexity), 8 requests (tasks), "
                   "32 examples (accuracy); tasks also take 'auto' (lm-eval's largest batch that fits)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--json", help="write the result with its protocol to this file")


def _batch_size(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', not {text!r}")
    return value


def run(args):
    if not args.data and not args.tasks:
        raise SlimlmError("nothing to evaluate: pass --data FILE (perplexity or accuracy) and/or --tasks NAMES")
    if args.data and args.batch_size == "auto":
        raise SlimlmError("--batch-size auto is for --tasks only: give perplexity and accuracy a number")
    loaded = models.load(args.model, args.dtype, devices.resolve(args.device, announce=True))
    if loaded.kind == "causal-lm":  # windows (perplexity) and the longest task input
        args.seqlen = models.fit_seqlen(loaded.model.config, args.seqlen, "--seqlen")
    if args.tasks:
        _tasks(loaded, args)
    if args.data:
        _data(loaded, args)


def _tasks(loaded, args):
    from ..eval.tasks import format_table, run_tasks

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    result = run_tasks(loaded, names, args.include_path, limit, args.num_fewshot, args.batch_size or 8,
                       args.seqlen, args.seed, args.log_samples, args.output_path)
    print(format_table(result))
    if args.json:
        text = json.dumps({"model": args.model, "tasks": result}, indent=2)
        output.write_atomically(args.json, lambda p: p.write_text(text))
    folder = Path(args.model)
    if not args.no_report and (folder / "report.json").is_file():
        output.record_task_scores(folder, result)
        print(f"scores recorded in {folder / 'report.json'} and its model card")


def _data(loaded, args):
    if loaded.kind == "sequence-classification":
        return _accuracy(loaded, args)
    if loaded.kind != "causal-lm":
        raise SlimlmError(f"model '{args.model}' is an {loaded.kind} model without a task head: fine-tune it first "
                          "(slimlm finetune) or give a causal LM")
    stream = data.load_tokens(loaded.tokenizer, args.data)
    result = {"model": args.model,
              **perplexity(loaded.model, stream, args.seqlen, args.max_windows, args.batch_size or 1, args.bos)}
    print(f"perplexity {result['perplexity']:.4f} ({result['windows']} windows x {args.seqlen} tokens of {args.data}, "
          f"BOS: {result['bos']})")
    folder = Path(args.model)
    if not args.no_report and (folder / "report.json").is_file():
        output.record_perplexity(folder, result)
        print(f"perplexity recorded in {folder / 'report.json'}")
    _write_json(args, result)


def _write_json(args, result):
    if args.json:  # with --tasks as well, one file holds both
        path = Path(args.json)
        if args.tasks and path.is_file():
            result = {**json.loads(path.read_text()), **result}
        text = json.dumps(result, indent=2)
        output.write_atomically(path, lambda p: p.write_text(text))


def _accuracy(loaded, args):
    config = loaded.model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    examples = data.load_labeled(loaded.tokenizer, args.data, args.max_length, names)
    result = {"model": args.model, **accuracy(loaded.model, examples, batch_size=args.batch_size or 32)}
    print(f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['examples']} examples of {args.data})")
    _write_json(args, result)
