"""A local lm-eval task on real text, for machines without the Hugging Face hub: `sotu_next`.

Each example is a passage of a State of the Union address (the context) and four candidate next
sentences: the sentence that really follows and three sentences drawn from other addresses. The
model picks the candidate with the highest log-likelihood (lm-eval's `acc`; `acc_norm` divides by
the candidate's length in bytes). Chance is 25%.

    python benchmarks/sotu_next_task.py --data ../shared/data/sotu/test.txt --out runs/tasks
    slimlm eval --model smollm2-135m --tasks sotu_next --include-path runs/tasks --limit 100
"""
import argparse
import json
import random
import re
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def sentences(address: str) -> list[str]:
    """Sentences of 6 to 60 words (shorter ones are headings or fragments, longer ones run-ons)."""
    return [s.strip() for s in SENTENCE_END.split(address) if 6 <= len(s.split()) <= 60]


def build_examples(text: str, n: int, seed: int = 0, context_sentences: int = 3, choices: int = 4) -> list[dict]:
    """`n` examples from a text of addresses separated by blank lines, chosen with `seed`."""
    rng = random.Random(seed)
    addresses = [sentences(a) for a in text.split("\n\n")]
    addresses = [a for a in addresses if len(a) > context_sentences]
    if len(addresses) < choices:
        raise ValueError(f"need at least {choices} addresses with more than {context_sentences} sentences")
    examples = []
    while len(examples) < n:
        a = rng.randrange(len(addresses))
        doc = addresses[a]
        i = rng.randrange(context_sentences, len(doc))
        others = rng.sample([j for j in range(len(addresses)) if j != a], choices - 1)
        candidates = [doc[i]] + [rng.choice(addresses[j]) for j in others]
        order = list(range(choices))
        rng.shuffle(order)
        examples.append({"context": " ".join(doc[i - context_sentences : i]),
                         "choices": [candidates[k] for k in order], "label": order.index(0)})
    return examples


def write_task(out: Path, text: str, n: int, seed: int = 0, name: str = "sotu_next") -> Path:
    """Write NAME.jsonl and NAME.yaml into `out`; returns the YAML path."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in build_examples(text, n, seed)))
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(YAML.format(name=name, data=data.resolve()))
    return yaml_path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/sotu/test.txt")
    ap.add_argument("--out", default="runs/tasks")
    ap.add_argument("-n", type=int, default=500, help="examples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_task(Path(args.out), Path(args.data).read_text(), args.n, args.seed))


if __name__ == "__main__":
    main()
