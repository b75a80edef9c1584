"""Text in, token windows out: plain text files, JSONL with a `text` field, or HF datasets by name."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SlimlmError


BUILTIN_TEXTS = ("python-docs:train", "python-docs:test")


def python_docs(split: str) -> str:
    """English prose of the Python documentation that ships with CPython (pydoc_data): text that is
    on every machine with Python, hub or not. Every 5th topic (sorted by name) is the test split."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 5 == 4) == (split == "test")]
    return "\n\n".join(topics[n] for n in chosen)


FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".md")


def read_text(spec: str, split: str = "test") -> str:
    """Read a whole corpus as one string. Documents are joined with a blank line (the WikiText
    protocol of the SparseGPT/Wanda evaluations joins its lines with "\\n\\n"). `split`: the split of a
    dataset spec that names none (train for training and calibration, test for evaluation)."""
    path = Path(spec).expanduser()
    if spec in BUILTIN_TEXTS:
        return python_docs(spec.split(":")[1])
    if path.is_file():
        if path.suffix == ".jsonl":
            docs = []
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise SlimlmError(f"{spec}, line {lineno}: expected a JSON object with a 'text' field") from None
            text = "\n\n".join(docs)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    elif path.exists():
        raise SlimlmError(f"{spec} is not a file: give a .txt or .jsonl file, or a dataset name")
    elif looks_like_dataset(spec):
        text = _read_hf_dataset(spec, split)
    else:
        raise SlimlmError(f"data not found: {spec} (give a .txt or .jsonl file, or a dataset name like "
                          "wikitext:wikitext-2-raw-v1:test)")
    if not text.strip():
        raise SlimlmError(f"data '{spec}' is empty")
    return text


def looks_like_dataset(spec: str) -> bool:
    """A spec that is not a path (no ./ / ~ prefix, no file suffix) is a dataset `name[:config[:split]]`
    ('wikitext:wikitext-2-raw-v1:test', 'Salesforce/wikitext:wikitext-2-raw-v1')."""
    name = spec.split(":")[0]
    return (bool(name) and spec.count(":") <= 2 and not spec.startswith((".", "/", "~"))
            and not name.lower().endswith(FILE_SUFFIXES) and name.count("/") <= 1)


def parse_dataset_spec(spec: str, split: str) -> tuple[str, str | None, str]:
    """(name, config or None, split) of 'name[:config[:split]]'; empty parts take the defaults."""
    name, config, given = (spec.split(":") + [None, None])[:3]
    return name, config or None, given or split


def _read_hf_dataset(spec: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise SlimlmError(f"'{spec}' is not a local file; loading hub datasets needs `pip install datasets`") from None
    name, config, split = parse_dataset_spec(spec, split)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types; report one line
        raise SlimlmError(f"could not load dataset '{spec}' (split {split}): {str(err).splitlines()[0]}") from None
    if "text" not in ds.column_names:
        raise SlimlmError(f"dataset '{spec}' has no 'text' column (it has {', '.join(ds.column_names)})")
    return "\n\n".join(ds["text"])


@dataclass
class TokenStream:
    ids: torch.Tensor  # 1-D LongTensor of the whole tokenized corpus
    source: str
    bos_added: bool  # the tokenizer put its BOS token in front (models trained that way expect one)
    bos_id: int | None = None  # the tokenizer's BOS token, if it has one


def tokenize(tokenizer, text: str, source: str) -> TokenStream:
    """Tokenize once, as the whole corpus (no per-document truncation)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    bos = getattr(tokenizer, "bos_token_id", None)
    return TokenStream(ids=ids, source=source, bos_added=bos is not None and len(ids) > 0 and int(ids[0]) == bos,
                       bos_id=bos)


def load_tokens(tokenizer, spec: str, split: str = "test") -> TokenStream:
    """Tokenized text of `spec`; `split` as in read_text (pass 'train' for training and calibration)."""
    return tokenize(tokenizer, read_text(spec, split), spec)


BOS_MODES = ("auto", "window", "stream")


def bos_mode(stream: TokenStream, asked: str) -> str:
    """Where evaluation windows get a BOS token. `stream`: the SparseGPT/Wanda protocol (tokenize once, cut
    windows: only the first window starts with BOS, and only if the tokenizer adds one). `window`: every
    window starts with BOS, as lm-eval's rolling log-likelihood does; models trained to always see one
    score far worse without it. `auto`: `window` when the tokenizer adds a BOS token, else `stream`."""
    if asked not in BOS_MODES:
        raise SlimlmError(f"unknown BOS mode '{asked}': choose one of {', '.join(BOS_MODES)}")
    if asked == "auto":
        return "window" if stream.bos_added else "stream"
    if asked == "window" and stream.bos_id is None:
        raise SlimlmError(f"the tokenizer of '{stream.source}' has no BOS token: evaluate with the stream protocol")
    return asked


def eval_windows(stream: TokenStream, seqlen: int, max_windows: int | None = None, bos: str = "stream") -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens, remainder dropped: (n_windows, seqlen). With bos='window'
    each window is the BOS token followed by the next seqlen - 1 tokens of text (the stream's own leading
    BOS dropped), so every text token is predicted once and each window starts as the model was trained."""
    ids, width = stream.ids, seqlen
    if bos == "window":
        ids, width = (ids[1:] if stream.bos_added else ids), seqlen - 1
    n = ids.numel() // width if width > 0 else 0
    if n == 0:
        raise SlimlmError(f"data '{stream.source}' has {stream.ids.numel()} tokens, fewer than one window "
                          f"of {seqlen}: use more text or a smaller --seqlen")
    if max_windows:
        n = min(n, max_windows)
    windows = ids[: n * width].reshape(n, width)
    if bos == "window":
        windows = torch.cat([torch.full((n, 1), stream.bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


def calibration_windows(stream: TokenStream, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows at random offsets, drawn as the SparseGPT/Wanda reference code draws them
    (Python's random seeded with `seed`, randint(0, n_tokens - seqlen - 1))."""
    n_tokens = stream.ids.numel()
    if n_tokens <= seqlen:
        raise SlimlmError(f"calibration data '{stream.source}' has {n_tokens} tokens, too few for one window "
                          f"of {seqlen}: use more text or a smaller --seqlen")
    if nsamples < 1:
        raise SlimlmError(f"--nsamples must be at least 1, got {nsamples}")
    rng = random.Random(seed)
    starts = [rng.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream.ids[s : s + seqlen] for s in starts])


# ---------------------------------------------------------------------------------------------
# Labeled text (sequence classification): JSONL with `text` and `label` (labels may be strings)

def read_labeled(spec: str) -> tuple[list[str], list[str]]:
    path = Path(spec).expanduser()
    if not path.is_file() or path.suffix != ".jsonl":
        raise SlimlmError(f"labeled data must be a .jsonl file with 'text' and 'label' fields, got '{spec}'")
    texts, labels = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                labels.append(str(row["label"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SlimlmError(f"{spec}, line {lineno}: expected a JSON object with 'text' and 'label' fields") from None
    if not texts:
        raise SlimlmError(f"labeled data '{spec}' is empty")
    return texts, labels


def label_names(labels: list[str]) -> list[str]:
    """Class order: numeric labels by value, others alphabetically (stable across runs and files)."""
    unique = set(labels)
    if all(x.lstrip("-").isdigit() for x in unique):
        return sorted(unique, key=int)
    return sorted(unique)


@dataclass
class LabeledExamples:
    """Tokenized, padded examples: input_ids and attention_mask (n, max_length), labels (n,)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    source: str


def load_labeled(tokenizer, spec: str, max_length: int, names: list[str] | None = None) -> LabeledExamples:
    texts, labels = read_labeled(spec)
    names = names or label_names(labels)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise SlimlmError(f"{spec} has labels the model does not know: {', '.join(unknown[:5])} "
                          f"(known: {', '.join(names[:10])})")
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return LabeledExamples(enc.input_ids, enc.attention_mask, torch.tensor([index[x] for x in labels]), names, spec)
