"""Where text comes from: documents of a data spec, read lazily, one at a time, with a fingerprint.

A spec is a `.txt` file (one document), a `.jsonl` file (one document per line, its text in a named
field), a `.parquet` file (one document per row), a folder of such files (sorted by path, recursively),
a Hugging Face dataset `name[:config[:split]]` (optionally streamed), or a built-in text. Nothing here
holds more than one document (or one batch of rows) in memory, so a corpus of any size can be read.
The fingerprint (paths, sizes, modification times; the dataset's name and settings) keys the token cache.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from .errors import SlimlmError, first_line

BUILTIN_TEXTS = ("python-docs:train", "python-docs:test")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".md")
READABLE = (".txt", ".md", ".jsonl", ".parquet")  # what a folder's documents may be


class Piece(NamedTuple):
    """Text of a document, or of a part of one (`ends` False: the document continues in the next piece),
    with the bytes of the source read so far (for progress)."""
    text: str
    ends: bool
    done: int


@dataclass(frozen=True)
class Source:
    """A resolved data spec: `kind` (builtin | file | folder | dataset), the files it reads, and its
    settings. `pieces()` yields the documents as Pieces."""
    spec: str
    kind: str
    split: str
    text_field: str = "text"
    streaming: bool = False
    files: tuple[Path, ...] = ()

    def fingerprint(self) -> dict:
        """What identifies the data without reading it: a file changes size or mtime when rewritten."""
        if self.kind == "dataset":
            name, config, split = parse_dataset_spec(self.spec, self.split)
            return {"dataset": name, "config": config, "split": split, "streaming": self.streaming,
                    "text_field": self.text_field}
        if self.kind == "builtin":  # pydoc_data's text changes with the Python release
            return {"builtin": self.spec, "python": platform.python_version()}
        stats = [(str(p.resolve()), *_stat(p)) for p in self.files]
        return {"files": stats, "text_field": self.text_field}

    def total_bytes(self) -> int | None:
        return sum(_stat(p)[0] for p in self.files) if self.files else None

    def pieces(self) -> Iterator[Piece]:
        if self.kind == "builtin":
            text = python_docs(self.spec.split(":")[1])
            yield Piece(text, True, len(text.encode()))
            return
        if self.kind == "dataset":
            yield from _dataset_documents(self)
            return
        done = 0
        for path in self.files:
            try:
                for piece in _file_documents(path, self.text_field):
                    yield piece._replace(done=done + piece.done)
            except OSError as err:  # a disk or network file system failing mid-file
                raise SlimlmError(f"cannot read {path}: {err.strerror or err}: check the file and its disk") from None
            done += _stat(path)[0]

    def documents(self) -> Iterator[str]:
        """Whole documents (a text file's pieces joined): for small corpora and tests."""
        parts = []
        for piece in self.pieces():
            parts.append(piece.text)
            if piece.ends:
                yield "".join(parts)
                parts = []


def resolve(spec: str, split: str = "test", text_field: str = "text", streaming: bool = False) -> Source:
    """The Source of `spec`; `split`: the split of a dataset spec that names none."""
    if spec in BUILTIN_TEXTS:
        return Source(spec, "builtin", split)
    path = Path(spec).expanduser()
    if path.is_file():
        return Source(spec, "file", split, text_field, files=(path,))
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READABLE))
        if not files:
            raise SlimlmError(f"folder {spec} has no {', '.join(READABLE)} files: put the corpus there or name a file")
        return Source(spec, "folder", split, text_field, files=files)
    if path.exists():
        raise SlimlmError(f"{spec} is not a file: give a .txt or .jsonl file, or a dataset name")
    if looks_like_dataset(spec):
        return Source(spec, "dataset", split, text_field, streaming)
    raise SlimlmError(f"data not found: {spec} (give a .txt, .jsonl or .parquet file, a folder of them, or a "
                      "dataset name like wikitext:wikitext-2-raw-v1:test)")


def python_docs(split: str) -> str:
    """English prose of the Python documentation that ships with CPython (pydoc_data): text that is
    on every machine with Python, hub or not. Every 5th topic (sorted by name) is the test split."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 5 == 4) == (split == "test")]
    return "\n\n".join(topics[n] for n in chosen)


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


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise SlimlmError(f"cannot read {path}: {err.strerror}: check the path and its permissions") from None
    return st.st_size, st.st_mtime_ns


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as err:
        raise SlimlmError(f"cannot read {path}: {err.strerror}: check the path and its permissions") from None


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SlimlmError(f"{path}, line {lineno}: not UTF-8 text: convert the file to UTF-8 "
                          f"(e.g. iconv -f latin1 -t utf-8)") from None


def _file_documents(path: Path, field: str) -> Iterator[Piece]:
    if path.suffix == ".parquet":
        yield from _parquet_documents(path, field)
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, field)
    else:
        yield from _text_document(path)


# A .txt file is one document. It is read in pieces of about this many bytes, cut after a line, so a
# file of any size streams; data_tokens decides where the tokenizer may cut it.
TEXT_PIECE_BYTES = 1 << 20


def _text_document(path: Path) -> Iterator[Piece]:
    done, lines, size = 0, [], 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno)
            if "\r" in line:  # universal newlines, as Python's text mode (and slimlm before issue 18) reads
                line = line.replace("\r\n", "\n").replace("\r", "\n")
            lines.append(line)
            size += len(raw)
            if size >= TEXT_PIECE_BYTES:
                done += size
                yield Piece("".join(lines), False, done)
                lines, size = [], 0
    yield Piece("".join(lines), True, done + size)


def _text_of(value, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    kind = "null" if value is None else "a number" if isinstance(value, (int, float)) else type(value).__name__
    raise SlimlmError(f"{where}: field '{field}' is {kind}, not text: fix the record or name the text field "
                      "with data.text_field")


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict, int]]:
    """(line number, JSON object, bytes read so far) of every non-blank line; one-line errors for bytes
    that are not UTF-8, lines that are not JSON and JSON that is not an object."""
    done = 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            done += len(raw)
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SlimlmError(f"{path}, line {lineno}: not valid JSON: each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise SlimlmError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row, done


def text_field(row: dict, field: str, where: str) -> str:
    """The text under `field`, or a one-line error naming the record and what it holds instead."""
    if field not in row:
        raise SlimlmError(f"{where}: no '{field}' field (it has {', '.join(row) or 'none'}): "
                          "name the text field with data.text_field")
    return _text_of(row[field], where, field)


def _jsonl_documents(path: Path, field: str) -> Iterator[Piece]:
    for lineno, row, done in jsonl_rows(path):
        yield Piece(text_field(row, field, f"{path}, line {lineno}"), True, done)


def _parquet_documents(path: Path, field: str) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SlimlmError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise SlimlmError(f"cannot read {path} as parquet: {first_line(err)}") from None
    names = table.schema_arrow.names
    if field not in names:
        raise SlimlmError(f"{path} has no '{field}' column (it has {', '.join(names)}): name the text column "
                          "with data.text_field")
    size, row = _stat(path)[0], 0
    for g in range(table.num_row_groups):  # bytes are counted per row group (parquet is compressed)
        for batch in table.iter_batches(batch_size=1024, row_groups=[g], columns=[field]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield Piece(_text_of(value, f"{path}, row {row}", field), True, size * g // table.num_row_groups)


def _dataset_documents(source: Source) -> Iterator[Piece]:
    try:
        import datasets
    except ImportError:
        raise SlimlmError(f"'{source.spec}' is not a local file; loading hub datasets needs `pip install datasets`") from None
    name, config, split = parse_dataset_spec(source.spec, source.split)
    try:  # streaming=True reads rows as they arrive, without downloading the whole dataset first
        ds = datasets.load_dataset(name, config, split=split, **({"streaming": True} if source.streaming else {}))
    except Exception as err:  # the hub raises many types; report one line
        raise SlimlmError(f"could not load dataset '{source.spec}' (split {split}): {first_line(err)}") from None
    columns = ds.column_names
    if columns is not None and source.text_field not in columns:
        raise SlimlmError(f"dataset '{source.spec}' has no '{source.text_field}' column (it has {', '.join(columns)})")
    done = 0
    for i, value in enumerate(_column(ds, source.text_field), 1):
        text = _text_of(value, f"dataset '{source.spec}', row {i}", source.text_field)
        done += len(text.encode())
        yield Piece(text, True, done)


def _column(ds, field: str) -> Iterator:
    """The values of one column, a batch of rows at a time (never the whole column in memory)."""
    try:
        for batch in ds.iter(batch_size=1024):  # datasets.Dataset and IterableDataset alike
            yield from batch[field]
    except KeyError:  # a streamed dataset may not know its columns before its first rows
        raise SlimlmError(f"dataset rows have no '{field}' field: name the text field with data.text_field") from None
