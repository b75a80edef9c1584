"""The token cache: a corpus tokenized once, kept on disk as a flat int32 array that every later run,
every process of a torchrun job and every command memory-maps instead of tokenizing again.

An entry is a folder `<cache>/<key>/` holding `tokens.bin` (the ids, int32, native byte order) and
`meta.json` (counts and what was tokenized). The key hashes the data's fingerprint (paths, sizes and
modification times, or a dataset's name, config and split), the tokenizer (its full definition, not just
its name) and the settings (separator, token limit, format version): change any of them and a new entry
is built. The location is `data.cache_dir` in a recipe, else $SLIMLM_TOKEN_CACHE, else
~/.cache/slimlm/tokens; `off` (either way) tokenizes in memory and writes nothing.

The first process to ask for an entry builds it under an exclusive file lock; the others (torchrun's
other ranks, a second job on the same data) block on the lock and then open what it wrote. An entry is
written into a temporary folder and renamed into place, so a killed build leaves no half entry behind.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import SlimlmError

ENV = "SLIMLM_TOKEN_CACHE"
DEFAULT = "~/.cache/slimlm/tokens"
FORMAT = 1  # bump when what is written changes meaning
DTYPE = np.int32


def location(setting: str | None = None) -> Path | None:
    """The cache folder, or None when caching is off."""
    value = setting or os.environ.get(ENV) or DEFAULT
    return None if value.strip().lower() in ("off", "none", "false", "0") else Path(value).expanduser()


def tokenizer_identity(tokenizer) -> str:
    """A hash of everything that decides the ids: the fast tokenizer's full JSON (vocabulary, merges,
    normalizer, pre-tokenizer), or a slow one's vocabulary, plus the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
               "bos": getattr(tokenizer, "bos_token_id", None), "eos": getattr(tokenizer, "eos_token_id", None),
               "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None)}
    return _digest(definition + json.dumps(special, sort_keys=True, default=str))


def key(fingerprint: dict, tokenizer_id: str, settings: dict) -> str:
    return _digest(json.dumps({"data": fingerprint, "tokenizer": tokenizer_id, "settings": settings,
                               "format": FORMAT}, sort_keys=True, default=str))[:32]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def writable(folder: Path) -> bool:
    """Whether entries can be built in `folder` (created if need be): a read-only home directory
    should not stop a run that could tokenize in memory."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def open_or_build(folder: Path, entry: str, build: Callable[[Callable[[np.ndarray], None]], dict],
                  describe: dict) -> tuple[np.ndarray, dict, bool]:
    """(ids, meta, built): the entry's ids memory-mapped, building it first with `build(sink)` (which
    returns counts) when no process has. `describe` goes into meta.json for people reading the cache."""
    path = folder / entry
    if not (path / "meta.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{entry}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then find the entry
            try:
                if not (path / "meta.json").exists():
                    _build(path, build, describe)
                    return (*_open(path), True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return (*_open(path), False)


def _build(path: Path, build, describe: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            counts = build(lambda ids: f.write(np.ascontiguousarray(ids, dtype=DTYPE).tobytes()))
        meta = {**describe, **counts, "dtype": np.dtype(DTYPE).str, "format": FORMAT}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, path)  # atomic: readers see a whole entry or none
    except OSError as err:  # reading errors are SlimlmErrors already: this is the cache's own disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise SlimlmError(f"cannot write the token cache in {path.parent}: {err.strerror}: free space there, or "
                          f"set data.cache_dir / ${ENV} to another folder (off: no cache)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open(path: Path) -> tuple[np.ndarray, dict]:
    meta = json.loads((path / "meta.json").read_text())
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=DTYPE), meta
    # copy-on-write: a writable array (torch.from_numpy needs one) whose pages stay shared until written
    return np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="c", shape=(meta["tokens"],)), meta
