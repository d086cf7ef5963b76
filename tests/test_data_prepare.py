"""prepare_corpus: C4 shards and text files to .bin/.idx/.stats.json, workers, shards, limits, bad input.

Reference: SentencePiece called directly on the default model; the files are read back with
megatron-core's IndexedDataset.
"""

import gzip
import importlib.machinery
import json
import os
import signal
import sys
import types

import numpy
import pytest
import sentencepiece
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_simreg.data import build_tokenizer, default_tokenizer_path, prepare_corpus
from megatron_simreg.data import prepare as prepare_module
from megatron_simreg.data.indexed import token_dtype

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import prepare_data  # noqa: E402  (tools/prepare_data.py, the command users run)

LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die—to sleep,",
]
# 150 distinct documents of 1 to 12 lines: more than two batches of 64 go through the worker pool.
DOCUMENTS = [f"Document {i}.\n" + "\n".join(LINES[(i + k) % 5] for k in range(1 + i % 12)) for i in range(150)]


def write_c4_shard(path, documents, bad_lines=()):
    """What a C4 shard looks like: gzipped JSON lines with text, timestamp and url."""
    with gzip.open(path, "wb") as f:
        for i, text in enumerate(documents):
            record = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}
            f.write(json.dumps(record).encode("utf-8") + b"\n")
        for line in bad_lines:
            f.write(line + b"\n")


def read_documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def reference_documents(texts):
    """The reference: SentencePiece's ids of each text, then EOD."""
    processor = sentencepiece.SentencePieceProcessor(model_file=default_tokenizer_path())
    return [processor.encode(text) + [processor.eos_id()] for text in texts]


def test_c4_shard_to_indexed_dataset_and_back(tmp_path):
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    bad = [
        b"{not json", json.dumps({"url": "no text"}).encode(),
        b'{"text": "caf\xe9"}', json.dumps({"text": " "}).encode(),
    ]
    write_c4_shard(shard, DOCUMENTS[:40], bad_lines=bad)
    prefix = str(tmp_path / "out" / "c4_text_document")
    stats = prepare_corpus([str(shard)], prefix, progress=False)

    expected = reference_documents(DOCUMENTS[:40])
    eod = expected[0][-1]
    assert read_documents(prefix) == expected  # one EOD after each document, nothing else added
    assert all(eod not in ids[:-1] for ids in expected)
    assert IndexedDataset(prefix).index.dtype == numpy.uint16  # the smallest type a 32k vocabulary fits
    tokenizer = build_tokenizer()
    assert all(tokenizer.detokenize(ids[:-1]) == text for ids, text in zip(expected, DOCUMENTS))
    assert (stats.documents, stats.skipped_lines) == (40, 4)  # not JSON, no text, not UTF-8, empty
    assert stats.tokens == sum(map(len, expected))
    assert stats.bytes == sum(len(text.encode("utf-8")) for text in DOCUMENTS[:40])
    saved = json.loads(open(prefix + ".stats.json").read())
    assert saved["shards"] == ["c4_text_document"] and saved["vocab_size"] == 32000 and saved["eod"] == eod
    assert (saved["documents"], saved["tokens"], saved["skipped_lines"]) == (40, stats.tokens, 4)
    assert sorted(os.listdir(tmp_path / "out")) == [f"c4_text_document{s}" for s in (".bin", ".idx", ".stats.json")]


def test_text_files_folders_and_globs(tmp_path):
    folder = tmp_path / "books"
    (folder / "nested").mkdir(parents=True)
    (folder / "b.txt").write_bytes(b"Second book.\n\xff\xfe not UTF-8\nStill the second book.\n")
    (folder / "a.txt").write_text(DOCUMENTS[0])
    (folder / "nested" / "c.jsonl").write_text(json.dumps({"text": DOCUMENTS[1]}) + "\n")
    (folder / "notes.csv").write_text("ignored,file\n")
    stats = prepare_corpus([str(folder)], str(tmp_path / "folder"), progress=False)
    second_book = "Second book.\nStill the second book.\n"  # the undecodable line is dropped and counted
    # sorted paths: a.txt, b.txt, nested/c.jsonl; a text file is one document
    assert read_documents(str(tmp_path / "folder")) == reference_documents([DOCUMENTS[0], second_book, DOCUMENTS[1]])
    assert stats.skipped_lines == 1
    prepare_corpus([str(folder / "*.txt")], str(tmp_path / "glob"), progress=False)
    assert len(IndexedDataset(str(tmp_path / "glob"))) == 2


@pytest.mark.parametrize("shard_tokens", [None, 1500])
def test_two_workers_write_the_same_bytes_as_one(tmp_path, shard_tokens):
    shard = tmp_path / "in.jsonl.gz"
    write_c4_shard(shard, DOCUMENTS)
    one = prepare_corpus([str(shard)], str(tmp_path / "one"), workers=1, shard_tokens=shard_tokens, progress=False)
    two = prepare_corpus([str(shard)], str(tmp_path / "two"), workers=2, shard_tokens=shard_tokens, progress=False)
    assert (one.documents, one.tokens) == (two.documents, two.tokens) == (150, one.tokens)
    assert len(one.shards) == len(two.shards) == (1 if shard_tokens is None else len(one.shards))
    for name_one, name_two in zip(one.shards, two.shards):
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"{name_one}{suffix}").read_bytes() == (tmp_path / f"{name_two}{suffix}").read_bytes()


def test_shards_and_limits(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    prepare_corpus([str(source)], str(tmp_path / "whole"), progress=False)
    whole = read_documents(str(tmp_path / "whole"))
    assert whole == reference_documents(DOCUMENTS)

    stats = prepare_corpus([str(source)], str(tmp_path / "s"), shard_tokens=1000, progress=False)
    assert stats.shards == [f"s-{i:05d}" for i in range(len(stats.shards))] and len(stats.shards) > 3
    shards = [read_documents(str(tmp_path / name)) for name in stats.shards]
    assert [doc for shard in shards for doc in shard] == whole  # the shards are the whole corpus, in order
    for shard in shards[:-1]:  # a shard closes after the document that reaches shard_tokens
        assert sum(map(len, shard)) >= 1000 > sum(map(len, shard[:-1]))
    assert not (tmp_path / "s.bin").exists()

    limited = prepare_corpus([str(source)], str(tmp_path / "docs"), max_documents=7, workers=2, progress=False)
    assert read_documents(str(tmp_path / "docs")) == whole[:7] and limited.documents == 7
    budget = sum(map(len, whole[:10])) - 1  # reached inside the tenth document
    limited = prepare_corpus([str(source)], str(tmp_path / "tokens"), max_tokens=budget, progress=False)
    assert read_documents(str(tmp_path / "tokens")) == whole[:10]


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_leaves_nothing_that_looks_finished(tmp_path, monkeypatch, workers):
    """Ctrl-C midway through a sharded run: the finished shards and the open one are all removed."""
    real_iter = prepare_module.iter_documents

    def interrupted(*args, **kwargs):
        for index, document in enumerate(real_iter(*args, **kwargs)):
            if index == 120:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, as a real Ctrl-C is
            yield document

    monkeypatch.setattr(prepare_module, "iter_documents", interrupted)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    out = tmp_path / "out"
    # Python's own Ctrl-C handler, as in a terminal (a shell's background job inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus([str(source)], str(out / "c4"), shard_tokens=1000, workers=workers, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(out) == []


def test_bad_input_is_explained_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"no input found at .*missing\*\.json\.gz"):
        prepare_corpus([str(tmp_path / "missing*.json.gz")], str(out / "x"), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"body": "other field"}) + "\n")
    with pytest.raises(ValueError, match=r"no documents found in .*empty.jsonl \(2 lines skipped"):
        prepare_corpus([str(empty)], str(out / "x"), progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer .*nope.model.* not found"):
        prepare_corpus([str(empty)], str(out / "x"), tokenizer=str(tmp_path / "nope.model"), progress=False)
    with pytest.raises(ValueError, match="32000 tokens does not fit uint8"):
        prepare_corpus([str(empty)], str(out / "x"), dtype="uint8", progress=False)
    truncated = tmp_path / "truncated.json.gz"
    write_c4_shard(truncated, DOCUMENTS)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(ValueError, match="truncated.json.gz is not a complete gzip file"):
        prepare_corpus([str(truncated)], str(out / "x"), workers=2, progress=False)
    assert not out.exists() or os.listdir(out) == []  # nothing half-written

    assert token_dtype(32000) is numpy.uint16 and token_dtype(128256) is numpy.int32  # LLaMA-2 and LLaMA-3 sizes
    with pytest.raises(ValueError, match="128256 tokens does not fit uint16"):
        token_dtype(128256, "uint16")


def test_existing_output_is_kept_unless_overwritten(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    prefix = str(tmp_path / "c4")
    first = prepare_corpus([str(source)], prefix, shard_tokens=1000, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_corpus([str(source)], prefix, progress=False)
    second = prepare_corpus([str(source)], prefix, max_documents=5, overwrite=True, progress=False)
    assert len(first.shards) > 1 and second.shards == ["c4"]
    assert sorted(os.listdir(tmp_path)) == ["c4.bin", "c4.idx", "c4.stats.json", "in.jsonl"]  # old shards gone


def test_hugging_face_source_streams_the_named_dataset(tmp_path, monkeypatch):
    """The hub is not reachable from tests: a stand-in `datasets` module records the call and serves records."""
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": DOCUMENTS[0], "url": "u"}, {"text": ""}, {"url": "no text"}, {"text": DOCUMENTS[1]}])

    stand_in = types.ModuleType("datasets")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    stand_in.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", stand_in)
    stats = prepare_corpus(["hf:allenai/c4"], str(tmp_path / "c4"), progress=False)
    assert calls == [("allenai/c4", "en", "train", True)]
    assert (stats.documents, stats.skipped_lines) == (2, 2)
    assert read_documents(str(tmp_path / "c4")) == reference_documents([DOCUMENTS[0], DOCUMENTS[1]])

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'megatron-simreg\[data\]'"):
        prepare_corpus(["hf:allenai/c4"], str(tmp_path / "c4-again"), progress=False)


def test_a_pool_stopped_while_its_workers_start_does_not_hang(tmp_path):
    """The pool's workers inherit the main process's SIGTERM handler (one_line_errors') until they reset it; a
    SIGTERM from Pool.terminate landing in between (a small input done before the second worker started) was
    raised inside Python code run at fork, where CPython drops exceptions, so that worker lived on and the main
    process waited for it forever. Here every child spends a second in such code."""
    import contextlib
    import subprocess
    import textwrap

    script = tmp_path / "stopped_while_starting.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from megatron_simreg.cli import one_line_errors
        from megatron_simreg.data.encoding import DocumentEncoder
        from megatron_simreg.data.indexed import token_dtype
        os.register_at_fork(after_in_child=lambda: time.sleep(1.0))
        with one_line_errors("demo"), DocumentEncoder({default_tokenizer_path()!r}, token_dtype(32000), 2):
            pass  # nothing to encode: the pool is stopped at once
        print("stopped")
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=root), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a worker left waiting goes too
    assert (process.returncode, out) == (0, "stopped\n"), err[-2000:]


def test_command_line(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS[:20]))
    prepare_data.main(["--input", str(source), "--output-prefix", str(tmp_path / "cli"), "--workers", "2",
                       "--shard-tokens", "500", "--quiet"])
    report = capsys.readouterr().out
    assert "20 documents" in report and "cli-00000" in report
    assert json.loads((tmp_path / "cli.stats.json").read_text())["documents"] == 20
    with pytest.raises(SystemExit, match="prepare_data: .*already holds a dataset"):
        prepare_data.main(["--input", str(source), "--output-prefix", str(tmp_path / "cli"), "--quiet"])


def test_ctrl_c_ends_in_one_line_and_a_killed_runs_leftovers_go_at_the_next_start(tmp_path, monkeypatch, capsys):
    real_iter = prepare_module.iter_documents

    def interrupted(*args, **kwargs):
        for index, document in enumerate(real_iter(*args, **kwargs)):
            if index == 20:
                os.kill(os.getpid(), signal.SIGINT)
            yield document

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    out = tmp_path / "out"
    out.mkdir()
    leftovers = ["c4.partial.bin", "c4-00003.partial.idx", "c4.stats.json.partial"]  # what kill -9 leaves
    for name in leftovers + ["c4-notes.txt"]:
        (out / name).write_text("")
    monkeypatch.setattr(prepare_module, "iter_documents", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's Ctrl-C, as in a terminal
    try:
        with pytest.raises(SystemExit) as stop:
            prepare_data.main(["--input", str(source), "--output-prefix", str(out / "c4"), "--quiet"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"prepare_data: interrupted; nothing was written under {out / 'c4'} (partial files removed)"]
    assert sorted(os.listdir(out)) == ["c4-notes.txt"]  # the interrupted run's files and the old leftovers are gone
