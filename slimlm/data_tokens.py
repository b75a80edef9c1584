"""Documents in, token ids out, in bounded memory: text is tokenized a batch of segments at a time and
each batch's ids are handed to a sink (a cache file or a list) before the next batch is read.

Two ways to join documents (`separator`):
- `text`: the SparseGPT/Wanda protocol. Documents are joined with a blank line ("\\n\\n") and the result
  is tokenized as one string, with the tokenizer's own special tokens (e.g. BOS) at its ends. Long text
  is cut only where cutting provably changes nothing (see `_safe_cut`), so the ids equal those of one
  tokenizer call on the whole joined string: evaluation and calibration numbers do not move.
- `eos`: for training. Each document is tokenized alone and followed by the model's EOS token, so a
  window that spans two documents shows the model where one ends. The tokenizer's BOS (if it adds one)
  starts the stream once, as with `text`. A tokenizer without EOS separates documents with the ids of
  "\\n\\n" instead (the text protocol's separator), and says so.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable

import numpy as np

from .data_sources import Piece
from .errors import SlimlmError

SEPARATORS = ("text", "eos")
JOIN = "\n\n"
SEGMENT_CHARS = 1 << 18   # text handed to the tokenizer in one piece (bounded memory: ids, offsets, strings)
BATCH_CHARS = 1 << 21     # segments per tokenizer call (fast tokenizers run a batch on all cores)
FORCE_FACTOR = 8          # eos: a document with no safe cut is cut anyway at a line after this many segments
CONTEXT = 200             # characters either side of a cut that _safe_cut compares


def special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text of its own accord (e.g. [BOS], [])."""
    probe = "Hello world"
    full = list(_encode(tokenizer, [probe], True)[0])
    bare = list(_encode(tokenizer, [probe], False)[0])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def separator_ids(tokenizer, separator: str) -> list[int]:
    if separator not in SEPARATORS:
        raise SlimlmError(f"unknown separator '{separator}': choose one of {', '.join(SEPARATORS)}")
    if separator == "text":
        return []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return [int(eos)]
    warnings.warn("the tokenizer has no EOS token: documents are separated by the ids of a blank line instead")
    return list(_encode(tokenizer, [JOIN], False)[0])


def tokenize_pieces(tokenizer, pieces: Iterable[Piece], separator: str, sink: Callable[[np.ndarray], None],
                    max_tokens: int | None = None, progress=None) -> dict:
    """Tokenize the pieces into `sink` (1-D int32 arrays, in order). Stops after max_tokens ids.
    Returns counts: tokens, documents, bytes, seconds, and blank (no text but whitespace)."""
    prefix, suffix = special_ends(tokenizer)
    sep = separator_ids(tokenizer, separator)
    state = {"tokens": 0, "documents": 0, "bytes": 0, "blank": True, "start": time.perf_counter()}
    batch: list[tuple[str, bool]] = []  # (segment text, whether a separator follows it)

    def emit(ids: np.ndarray) -> bool:
        if max_tokens:
            ids = ids[: max_tokens - state["tokens"]]
        if len(ids):
            sink(ids)
            state["tokens"] += len(ids)
        return bool(max_tokens) and state["tokens"] >= max_tokens

    def flush() -> bool:
        texts = [t for t, _ in batch]
        encoded = _encode(tokenizer, texts, False) if texts else []
        parts = []
        for (_, separated), ids in zip(batch, encoded):
            parts.append(np.asarray(ids, dtype=np.int32))
            if separated:
                parts.append(np.asarray(sep, dtype=np.int32))
        batch.clear()
        return emit(np.concatenate(parts)) if parts else False

    if emit(np.asarray(prefix, dtype=np.int32)):
        return _counts(state)
    buffer, batched, next_try = "", 0, SEGMENT_CHARS
    doc_starts, any_doc = True, False
    for piece in pieces:
        state["bytes"] = piece.done
        if separator == "text" and doc_starts and any_doc:
            buffer += JOIN  # the text protocol: the whole corpus is one string, documents joined by a blank line
        buffer += piece.text
        any_doc, doc_starts = True, piece.ends
        state["blank"] = state["blank"] and (not piece.text or piece.text.isspace())
        state["documents"] += piece.ends
        while len(buffer) > next_try:
            force = separator == "eos" and len(buffer) > FORCE_FACTOR * SEGMENT_CHARS
            cut = _safe_cut(tokenizer, buffer, force)
            if cut is None:  # try again once as much text again has come in
                next_try = len(buffer) + SEGMENT_CHARS
                break
            batch.append((buffer[:cut], False))
            batched += cut
            buffer, next_try = buffer[cut:], SEGMENT_CHARS
        if piece.ends and separator == "eos":
            batch.append((buffer, True))
            batched, buffer, next_try = batched + len(buffer), "", SEGMENT_CHARS
        if batched >= BATCH_CHARS:
            if flush():
                return _counts(state)
            batched = 0
            if progress is not None:
                progress(state)
    if buffer or separator == "text":
        batch.append((buffer, False))
    if not flush() and separator == "text":
        emit(np.asarray(suffix, dtype=np.int32))
    if progress is not None:
        progress(state)
    return _counts(state)


def _counts(state: dict) -> dict:
    return {"tokens": state["tokens"], "documents": state["documents"], "bytes": state["bytes"],
            "blank": state["blank"], "seconds": time.perf_counter() - state["start"]}


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["input_ids"]


def _safe_cut(tokenizer, text: str, force: bool) -> int | None:
    """A position in the last half of `text` where tokenizing the two sides apart gives the same ids as
    tokenizing them together, or None. Candidates are line ends that follow a word: regex pre-tokenizers
    (GPT-2, LLaMA-3, SmolLM2) never merge a word with the newline after it, and the run of newlines is
    tokenized the same with or without the text before it (cutting *after* newlines is not safe: a run
    of whitespace at the very end of a string is one pre-token). Each candidate is checked on the text
    around it, so a tokenizer that would merge there (or adds a prefix space to every call, like
    SentencePiece) is never cut. `force` (eos documents only): the last candidate, checked or not."""
    low = len(text) // 2
    candidates, pos = [], len(text)
    while len(candidates) < 16:
        pos = text.rfind("\n", low, pos)
        if pos <= 0:
            break
        if not text[pos - 1].isspace():
            candidates.append(pos)
    for cut in candidates:
        left, right = text[max(0, cut - CONTEXT):cut], text[cut:cut + CONTEXT]
        whole, a, b = _encode(tokenizer, [left + right, left, right], False)
        if list(whole) == list(a) + list(b):
            return cut
    if force:
        return candidates[0] if candidates else len(text) // 2
    return None


def collect(tokenizer, pieces: Iterable[Piece], separator: str, max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """All ids in memory (no cache): for small corpora and for checking the cached path."""
    parts: list[np.ndarray] = []
    counts = tokenize_pieces(tokenizer, pieces, separator, parts.append, max_tokens)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), counts
