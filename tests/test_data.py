"""The data path: sources, bounded-memory tokenization, the token cache, EOS between documents, the
packed-window sampler across processes and resumes, and one-line errors for bad data."""
import json
import os

import numpy as np
import pytest
import torch

from slimlm import data, data_cache, data_sources, data_tokens
from slimlm.errors import SlimlmError
from slimlm.train import distributed
from slimlm.train.datasets import Windows
from slimlm.train.engine import Hooks, Trainer


@pytest.fixture
def docs():
    from conftest import DATA

    sentences = (DATA / "sotu" / "valid.txt").read_text()[:30_000].split(". ")
    return [". ".join(sentences[i:i + 20]) + "." for i in range(0, 240, 20)]  # 12 documents


@pytest.fixture
def small_pieces(monkeypatch):
    """Segments and file pieces of a few hundred characters, so that small texts are cut many times."""
    monkeypatch.setattr(data_tokens, "SEGMENT_CHARS", 600)
    monkeypatch.setattr(data_tokens, "BATCH_CHARS", 2000)
    monkeypatch.setattr(data_sources, "TEXT_PIECE_BYTES", 500)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_text_protocol_equals_one_tokenizer_call_on_the_joined_text(tokenizer, docs, tmp_path, small_pieces,
                                                                     monkeypatch):
    """Cut into many segments, the text protocol still gives the ids of the whole joined string (the
    SparseGPT/Wanda protocol): evaluation and calibration numbers do not move."""
    cuts, safe_cut = [], data_tokens._safe_cut
    monkeypatch.setattr(data_tokens, "_safe_cut", lambda *a: cuts.append(safe_cut(*a)) or cuts[-1])
    text = "\n\n".join(docs)
    (tmp_path / "c.txt").write_text(text)
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    whole = tokenizer(text, verbose=False).input_ids
    for name in ("c.txt", "c.jsonl"):
        stream = data.load_tokens(tokenizer, str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
        assert stream.ids.tolist() == whole, name
    assert data.tokenize(tokenizer, text, "t").ids.tolist() == whole
    assert sum(c is not None for c in cuts) >= 10


def test_cached_and_uncached_paths_give_identical_windows(tokenizer, docs, tmp_path, small_pieces):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    for separator in ("text", "eos"):
        built = data.load_tokens(tokenizer, str(path), separator=separator, cache_dir=str(tmp_path / "cache"))
        cached = data.load_tokens(tokenizer, str(path), separator=separator, cache_dir=str(tmp_path / "cache"))
        plain = data.load_tokens(tokenizer, str(path), separator=separator, cache_dir="off")
        for stream in (cached, plain):
            assert torch.equal(stream.ids.long(), built.ids.long())
            assert torch.equal(Windows(stream, 32).get(list(range(len(Windows(stream, 32)))))["input_ids"],
                               Windows(built, 32).get(list(range(len(Windows(built, 32)))))["input_ids"])
        assert torch.equal(data.eval_windows(cached, 32), data.eval_windows(plain, 32))


def test_second_load_reads_the_cache_without_tokenizing(tokenizer, docs, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    cache = tmp_path / "cache"
    first = data.load_tokens(tokenizer, str(path), separator="eos", cache_dir=str(cache))
    assert len(entries(cache)) == 1
    meta = json.loads((cache / entries(cache)[0] / "meta.json").read_text())
    assert meta["tokens"] == len(first) and meta["documents"] == len(docs)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_tokens, "tokenize_pieces", refuse)
    monkeypatch.setattr(data_sources.Source, "pieces", refuse)
    again = data.load_tokens(tokenizer, str(path), separator="eos", cache_dir=str(cache))
    assert torch.equal(again.ids, first.ids)


def test_cache_invalidated_by_tokenizer_settings_and_data(tokenizer, docs, tmp_path):
    from conftest import train_tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    cache = str(tmp_path / "cache")
    load = lambda tok=tokenizer, **kw: data.load_tokens(tok, str(path), cache_dir=cache, **kw)  # noqa: E731
    load()
    load()
    assert len(entries(tmp_path / "cache")) == 1
    load(separator="eos")
    load(max_tokens=100)
    other = train_tokenizer()
    other.add_tokens(["Congress"])  # same class and name, different ids
    load(other)
    assert len(entries(tmp_path / "cache")) == 4
    write_jsonl(path, [{"text": d} for d in docs[:-1]])  # the file is rewritten: size and mtime change
    assert torch.equal(load().ids, data.load_tokens(tokenizer, str(path), cache_dir="off").ids)
    assert len(entries(tmp_path / "cache")) == 5


def test_eos_between_documents(tokenizer, docs, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs[:3]])
    stream = data.load_tokens(tokenizer, str(path), separator="eos")
    eos = tokenizer.eos_token_id
    expected = []
    for d in docs[:3]:
        expected += tokenizer(d, add_special_tokens=False).input_ids + [eos]
    assert stream.ids.tolist() == expected and stream.separator == "eos"
    assert stream.ids.tolist().count(eos) == 3
    # the text protocol has no EOS: documents joined by a blank line
    assert eos not in data.load_tokens(tokenizer, str(path)).ids.tolist()


def test_a_tokenizer_without_eos_separates_documents_by_a_blank_line(docs, tmp_path):
    from conftest import train_tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs[:2]])
    tokenizer = train_tokenizer()
    tokenizer.eos_token = None
    with pytest.warns(UserWarning, match="no EOS token"):
        stream = data.load_tokens(tokenizer, str(path), separator="eos", cache_dir="off")
    blank = tokenizer("\n\n", add_special_tokens=False).input_ids
    first = tokenizer(docs[0], add_special_tokens=False).input_ids
    assert stream.ids.tolist()[: len(first) + len(blank)] == first + blank


def test_text_files_read_with_universal_newlines(tokenizer, tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"First line.\r\nSecond line.\rThird.\n")
    stream = data.load_tokens(tokenizer, str(tmp_path / "crlf.txt"))
    assert stream.ids.tolist() == tokenizer("First line.\nSecond line.\nThird.\n").input_ids


def test_a_long_document_is_one_document(tokenizer, docs, tmp_path, small_pieces):
    """A .txt file is one document: cut for the tokenizer, one EOS at its end, ids as one call gives."""
    text = "\n\n".join(docs)
    (tmp_path / "a.txt").write_text(text)
    stream = data.load_tokens(tokenizer, str(tmp_path / "a.txt"), separator="eos")
    assert stream.ids.tolist() == tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_folders_parquet_and_streamed_datasets(tokenizer, docs, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0])
    write_jsonl(folder / "b.jsonl", [{"body": docs[1]}, {"body": docs[2]}])
    pq.write_table(pa.table({"body": [docs[3], docs[4]]}), folder / "sub" / "c.parquet")
    stream = data.load_tokens(tokenizer, str(folder), separator="eos", text_field="body")
    expected = []
    for d in docs[:5]:
        expected += tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert stream.ids.tolist() == expected

    datasets = pytest.importorskip("datasets")
    asked = []

    def load_dataset(name, config=None, split=None, streaming=False):
        asked.append(streaming)
        return datasets.Dataset.from_dict({"text": docs * 50}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    streamed = data.load_tokens(tokenizer, "corpus:plain:train", separator="eos", streaming=True, max_tokens=500)
    every = []
    for d in docs * 50:
        every += tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert asked == [True] and streamed.ids.tolist() == every[:500]


def test_same_batches_for_one_and_two_processes_and_resume(model_dirs, tokenizer, docs, tmp_path, monkeypatch):
    """Batch i is a pure function of (seed, i): two ranks' shares make the one-process batch, and a
    trainer built later (a resume, reading the cache) draws the same batch i."""
    from slimlm import models, recipe

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    rec = recipe.resolve("finetune", [f"model={model_dirs['llama']}", f"data.train={path}", "data.seqlen=16",
                                      "train.batch_size=4", "train.steps=4", "train.warmup_steps=1"])
    loaded = models.load(rec["model"])
    stream = data.load_tokens(tokenizer, str(path), separator="eos")
    one = Trainer(loaded.model, Hooks(), rec, stream, None, tmp_path / "run")
    batches = [one.batch(i)["input_ids"] for i in (0, 3, 17)]
    for rank_size, expected in (((0, 2), slice(0, 2)), ((1, 2), slice(2, 4))):
        monkeypatch.setattr(distributed, "world", lambda rs=rank_size: rs)
        share = [one.batch(i)["input_ids"] for i in (0, 3, 17)]
        assert all(torch.equal(s, b[expected]) for s, b in zip(share, batches))
    monkeypatch.undo()
    later = Trainer(loaded.model, Hooks(), rec, data.load_tokens(tokenizer, str(path), separator="eos"), None,
                    tmp_path / "run2")
    assert all(torch.equal(later.batch(i)["input_ids"], b) for i, b in zip((17, 0, 3), [batches[2], batches[0], batches[1]]))


@pytest.mark.parametrize("row, message", [
    ({"body": "x"}, r"line 2: no 'text' field \(it has body\): name the text field with data.text_field"),
    ({"text": 3}, "line 2: field 'text' is a number, not text"),
    ({"text": None}, "line 2: field 'text' is null, not text"),
])
def test_jsonl_text_field_errors_name_the_line(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, row])
    with pytest.raises(SlimlmError, match=message) as err:
        data.load_tokens(tokenizer, str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_bytes_unreadable_files_and_short_corpora(tokenizer, tmp_path):
    for name in ("latin.txt", "latin.jsonl"):
        (tmp_path / name).write_bytes(b'{"text": "caf\xe9"}\n' if name.endswith("jsonl") else b"ok\ncaf\xe9\n")
        with pytest.raises(SlimlmError, match=rf"{name}, line \d: not UTF-8 text: convert the file to UTF-8"):
            data.load_tokens(tokenizer, str(tmp_path / name))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(SlimlmError, match="is empty"):
        data.load_tokens(tokenizer, str(tmp_path / "blank.txt"))
    short = data.load_tokens(tokenizer, _write(tmp_path / "short.txt", "A few words."))
    with pytest.raises(SlimlmError, match="fewer than one window of 256"):
        Windows(short, 256)
    with pytest.raises(SlimlmError, match="fewer than one window of 256"):
        data.eval_windows(short, 256)
    with pytest.raises(SlimlmError, match="unknown separator 'x'"):
        data.load_tokens(tokenizer, str(tmp_path / "short.txt"), separator="x")


def test_an_unreadable_file_is_one_line(tokenizer, tmp_path, monkeypatch):
    import pathlib

    locked = _write(tmp_path / "locked.txt", "text")
    opened = pathlib.Path.open

    def refuse(self, *args, **kwargs):  # what chmod 000 does to anyone but root
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    with pytest.raises(SlimlmError, match="cannot read .*locked.txt: Permission denied: check the path and its permissions"):
        data.load_tokens(tokenizer, locked, cache_dir="off")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_cache_location_follows_setting_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data_cache.ENV, str(tmp_path / "env"))
    assert data_cache.location(None) == tmp_path / "env"
    assert data_cache.location(str(tmp_path / "recipe")) == tmp_path / "recipe"
    assert data_cache.location("off") is None
    monkeypatch.delenv(data_cache.ENV)
    assert str(data_cache.location(None)).endswith(".cache/slimlm/tokens")


def _open_entry(folder, log):
    """A process asking for a cache entry (as a torchrun rank does); the build is slow and logged."""
    import time

    def build(sink):
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # long enough for the other process to arrive while it runs
        sink(np.arange(1000, dtype=np.int32))
        return {"tokens": 1000, "documents": 1, "bytes": 0, "blank": False, "seconds": 0.5}

    ids, meta, _ = data_cache.open_or_build(folder, "entry", build, {})
    assert ids.sum() == np.arange(1000).sum() and meta["tokens"] == 1000


def test_one_process_builds_an_entry_while_the_others_wait(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_open_entry, args=(tmp_path / "cache", tmp_path / "log")) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "log").read_text() == "built\n"
    assert entries(tmp_path / "cache") == ["entry"]


def test_an_unwritable_cache_folder_falls_back_to_memory(tokenizer, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    path = _write(tmp_path / "c.txt", "Some text for the cache.")
    with pytest.warns(UserWarning, match="is not writable: tokenizing .* in memory"):
        stream = data.load_tokens(tokenizer, path, cache_dir=str(tmp_path / "file" / "cache"))
    assert stream.ids.tolist() == tokenizer("Some text for the cache.").input_ids


@pytest.mark.parametrize("line, says", [('{"text": null, "label": "a"}', "field 'text' is null"),
                                        ('{"text": 5, "label": "a"}', "field 'text' is a number"),
                                        ('{"text": "x", "label": null}', "'label' field holding a string"),
                                        ('{"text": "x"}', "'label' field holding a string"),
                                        ('[1, 2]', "expected a JSON object")])
def test_labeled_data_refuses_records_that_are_not_text_and_label(tmp_path, line, says):
    """Labeled JSONL goes through the text reader's checks: a null text used to train as the string 'None'."""
    from slimlm.data import read_labeled
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n' + line + "\n")
    with pytest.raises(SlimlmError, match=says) as err:
        read_labeled(str(path))
    assert "line 2" in str(err.value)


def test_labeled_data_not_utf8_is_named(tmp_path):
    from slimlm.data import read_labeled
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1"))
    with pytest.raises(SlimlmError, match="line 1: not UTF-8"):
        read_labeled(str(path))
