"""Text in, token windows out. Sources (.txt, .jsonl, .parquet, folders, HF datasets: data_sources.py)
are tokenized in bounded memory (data_tokens.py) into an on-disk token cache (data_cache.py) that later
runs memory-map; this module turns the result into a TokenStream and cuts evaluation, calibration and
training windows from it. Labeled JSONL (`text`, `label`) for classifiers is at the end.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data_cache, data_sources, data_tokens
from .errors import SlimlmError

SEPARATORS = data_tokens.SEPARATORS


def read_text(spec: str, split: str = "test", text_field: str = "text") -> str:
    """A whole (small) corpus as one string, documents joined with a blank line (the WikiText protocol
    of the SparseGPT/Wanda evaluations joins its lines with "\n\n"). `split`: the split of a dataset
    spec that names none (train for training and calibration, test for evaluation)."""
    text = data_tokens.JOIN.join(data_sources.resolve(spec, split, text_field).documents())
    if not text.strip():
        raise SlimlmError(f"data '{spec}' is empty")
    return text


@dataclass
class TokenStream:
    ids: torch.Tensor  # 1-D integer tensor of the whole tokenized corpus (int32 memory-mapped from the cache)
    source: str
    bos_added: bool  # the tokenizer put its BOS token in front (models trained that way expect one)
    bos_id: int | None = None  # the tokenizer's BOS token, if it has one
    separator: str = "text"  # how documents were joined: a blank line (text) or the EOS token (eos)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def window(self, start: int, length: int) -> torch.Tensor:
        return self.ids[start:start + length].long()


def tokenize(tokenizer, text: str, source: str) -> TokenStream:
    """Tokenize one text as one string (no per-document truncation), in bounded memory."""
    ids, _ = data_tokens.collect(tokenizer, [data_sources.Piece(text, True, 0)], "text")
    return _stream(tokenizer, ids, source, "text")


def load_tokens(tokenizer, spec: str, split: str = "test", separator: str = "text", text_field: str = "text",
                streaming: bool = False, max_tokens: int | None = None, cache_dir: str | None = None) -> TokenStream:
    """Tokenized text of `spec`, through the token cache. `split` as in read_text (pass 'train' for
    training and calibration). `separator`: 'text' (documents joined by a blank line and tokenized as
    one string: the SparseGPT/Wanda protocol, used for evaluation and calibration) or 'eos' (each
    document followed by the model's EOS token: training). `max_tokens`: stop after that many (a
    streamed dataset is read only that far). `cache_dir`: see data_cache.location."""
    source = data_sources.resolve(spec, split, text_field, streaming)
    data_tokens.separator_ids(tokenizer, separator)  # an unknown separator fails before any reading
    settings = {"separator": separator, "max_tokens": max_tokens or None}
    folder = data_cache.location(cache_dir)
    if folder is not None and not data_cache.writable(folder):
        warnings.warn(f"token cache {folder} is not writable: tokenizing '{spec}' in memory (set data.cache_dir "
                      f"or ${data_cache.ENV} to a folder you can write, or to off)")
        folder = None
    if folder is None:
        ids, counts = data_tokens.collect(tokenizer, source.pieces(), separator, max_tokens)
    else:
        entry = data_cache.key(source.fingerprint(), data_cache.tokenizer_identity(tokenizer), settings)
        describe = {"source": spec, "fingerprint": source.fingerprint(), "settings": settings,
                    "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__)}

        def build(sink):
            with _Progress(spec, source.total_bytes()) as progress:
                return data_tokens.tokenize_pieces(tokenizer, source.pieces(), separator, sink, max_tokens, progress)

        ids, counts, _ = data_cache.open_or_build(folder, entry, build, describe)
    if counts["blank"] or not len(ids):
        raise SlimlmError(f"data '{spec}' is empty")
    return _stream(tokenizer, ids, spec, separator)


def _stream(tokenizer, ids: np.ndarray, source: str, separator: str) -> TokenStream:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = torch.from_numpy(ids) if isinstance(ids, np.ndarray) else ids
    return TokenStream(ids=ids, source=source, bos_added=bos is not None and len(ids) > 0 and int(ids[0]) == bos,
                       bos_id=bos, separator=separator)


def options(section: dict) -> dict:
    """load_tokens' reading options from a recipe's `data:` section (the same for every file it names)."""
    return {"text_field": section["text_field"], "streaming": section["streaming"], "cache_dir": section["cache_dir"]}


class _Progress:
    """A tqdm bar in bytes of text with tokens/s beside it, while a cache entry is built."""

    def __init__(self, spec: str, total: int | None):
        from tqdm.auto import tqdm

        # delay: a corpus that tokenizes in a moment (every evaluation set) shows no bar at all
        self.bar = tqdm(total=total, desc=f"tokenizing {spec}", unit="B", unit_scale=True, unit_divisor=1024,
                        mininterval=1.0, delay=2.0)

    def __call__(self, state: dict) -> None:
        self.bar.update(state["bytes"] - self.bar.n)
        elapsed = time.perf_counter() - state["start"]
        self.bar.set_postfix_str(f"{state['tokens'] / max(elapsed, 1e-9) / 1e3:.0f}k tokens/s", refresh=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


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
    n = window_count(stream, ids.numel(), width, seqlen)
    if max_windows:
        n = min(n, max_windows)
    windows = ids[: n * width].reshape(n, width).long()
    if bos == "window":
        windows = torch.cat([torch.full((n, 1), stream.bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


def window_count(stream: TokenStream, n_tokens: int, width: int, seqlen: int) -> int:
    """How many whole windows of `width` text tokens `n_tokens` of the stream hold; an error when none."""
    n = n_tokens // width if width > 0 else 0
    if n == 0:
        raise SlimlmError(f"data '{stream.source}' has {len(stream)} tokens, fewer than one window "
                          f"of {seqlen}: use more text or a smaller --seqlen (data.seqlen in a recipe)")
    return n


def calibration_windows(stream: TokenStream, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows at random offsets, drawn as the SparseGPT/Wanda reference code draws them
    (Python's random seeded with `seed`, randint(0, n_tokens - seqlen - 1))."""
    n_tokens = len(stream)
    if n_tokens <= seqlen:
        raise SlimlmError(f"calibration data '{stream.source}' has {n_tokens} tokens, too few for one window "
                          f"of {seqlen}: use more text or a smaller --seqlen")
    if nsamples < 1:
        raise SlimlmError(f"--nsamples must be at least 1, got {nsamples}")
    rng = random.Random(seed)
    starts = [rng.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream.window(s, seqlen) for s in starts])


# ---------------------------------------------------------------------------------------------
# Labeled text (sequence classification): JSONL with `text` and `label` (labels may be strings)

def read_labeled(spec: str) -> tuple[list[str], list[str]]:
    path = Path(spec).expanduser()
    if not path.is_file() or path.suffix != ".jsonl":
        raise SlimlmError(f"labeled data must be a .jsonl file with 'text' and 'label' fields, got '{spec}'")
    texts, labels = [], []
    for lineno, row, _ in data_sources.jsonl_rows(path):  # the JSONL reader of text data, and its errors
        where = f"{spec}, line {lineno}"
        texts.append(data_sources.text_field(row, "text", where))
        label = row.get("label")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise SlimlmError(f"{where}: expected a 'label' field holding a string or an integer, got {label!r}")
        labels.append(str(label))
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
