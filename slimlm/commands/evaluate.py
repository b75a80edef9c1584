import json

from .. import data, models
from ..errors import SlimlmError
from ..evaluate import accuracy, perplexity

HELP = ("Measure token perplexity (SparseGPT/Wanda protocol) of a causal LM on a text, or the accuracy of a "
        "classifier on JSONL {text, label}.")


def add_arguments(p):
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=".txt, .jsonl with a 'text' field, or dataset name; "
                   "for a classifier, .jsonl with 'text' and 'label'")
    p.add_argument("--max-length", type=int, default=128, help="classifier: tokens per example")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the result with its protocol to this file")


def run(args):
    loaded = models.load(args.model, args.dtype, args.device)
    if loaded.kind == "sequence-classification":
        return _accuracy(loaded, args)
    if loaded.kind != "causal-lm":
        raise SlimlmError(f"model '{args.model}' is an {loaded.kind} model without a task head: fine-tune it first "
                          "(slimlm finetune) or give a causal LM")
    stream = data.load_tokens(loaded.tokenizer, args.data)
    result = {"model": args.model, **perplexity(loaded.model, stream, args.seqlen, args.max_windows, args.batch_size)}
    print(f"perplexity {result['perplexity']:.4f} ({result['windows']} windows x {args.seqlen} tokens of {args.data})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _accuracy(loaded, args):
    config = loaded.model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    examples = data.load_labeled(loaded.tokenizer, args.data, args.max_length, names)
    result = {"model": args.model, **accuracy(loaded.model, examples, batch_size=max(args.batch_size, 32))}
    print(f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['examples']} examples of {args.data})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
