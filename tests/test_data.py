"""Data pipeline: text -> .bin/.idx -> GPTDataset samples, C4 shards, workers, and bad input."""

import gzip
import json
import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_simreg.data import build_gpt_datasets, build_tokenizer, prepare_corpus

DOCUMENTS = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Or to take arms against a sea of troubles, and by opposing end them.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_c4_shard(path, documents, bad_lines=()):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25", "url": "https://example.org"}) + "\n")
        for line in bad_lines:
            f.write(line + "\n")


def test_round_trip_to_gpt_samples(tmp_path, tokenizer):
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    write_c4_shard(shard, DOCUMENTS, bad_lines=["{not json", json.dumps({"no_text": 1})])
    prefix = str(tmp_path / "out" / "c4_text_document")
    stats = prepare_corpus([str(shard)], prefix, progress=False)
    assert stats.documents == len(DOCUMENTS) and stats.skipped_lines == 2
    assert json.loads(open(prefix + ".stats.json").read())["tokens"] == stats.tokens

    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(DOCUMENTS) and dataset.index.dtype == numpy.uint16  # 32k vocabulary fits uint16
    for index in (0, 1, 59):
        ids = dataset[index]
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]  # exactly one EOD, at the end
        assert tokenizer.detokenize(ids[:-1].tolist()) == DOCUMENTS[index]

    train, valid, test = build_gpt_datasets(prefix, tokenizer, seq_length=16, num_samples=(20, 5, 0), split="80,20,0")
    assert test is None and len(train) >= 20 and len(valid) >= 5
    sample = train[0]
    assert sample["tokens"].shape == (16,) and sample["labels"].shape == (16,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()  # labels are the next tokens
    all_train = numpy.concatenate([train[i]["tokens"].numpy() for i in range(len(train))])
    all_valid = numpy.concatenate([valid[i]["tokens"].numpy() for i in range(len(valid))])
    assert len(all_train) > 3 * len(all_valid)  # the 80/20 document split


def test_workers_write_identical_bytes(tmp_path):
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i, document in enumerate(DOCUMENTS[:12]):
        (text_dir / f"{i:02d}.txt").write_text(document * (i + 1))
    one = prepare_corpus([str(text_dir)], str(tmp_path / "one"), workers=1, progress=False)
    two = prepare_corpus([str(text_dir)], str(tmp_path / "two"), workers=2, progress=False)
    assert one.tokens == two.tokens
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_shards_and_limits(tmp_path):
    shard = tmp_path / "in.jsonl"
    shard.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    stats = prepare_corpus([str(shard)], str(tmp_path / "s"), shard_tokens=200, max_documents=30, progress=False)
    assert stats.documents == 30 and len(stats.prefixes) > 1
    assert sum(len(IndexedDataset(p)) for p in stats.prefixes) == 30
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f]


def test_bad_input_is_explained_and_leaves_nothing(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="no input found"):
        prepare_corpus([str(tmp_path / "missing*.json.gz")], str(tmp_path / "x"), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ValueError, match="no documents"):
        prepare_corpus([str(empty)], str(tmp_path / "x"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]  # nothing half-written
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        prepare_corpus([str(empty)], str(tmp_path / "x"), tokenizer=str(tmp_path / "nope.model"), progress=False)
    with pytest.raises(ValueError, match="does not fit uint8"):
        prepare_corpus([str(empty)], str(tmp_path / "x"), dtype="uint8", progress=False)
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        build_gpt_datasets(str(tmp_path / "absent"), tokenizer, 16, (1, 1, 0))


def test_vocabulary_mismatch_and_short_data(tmp_path, tokenizer):
    shard = tmp_path / "in.jsonl"
    shard.write_text(json.dumps({"text": DOCUMENTS[0]}) + "\n")
    prefix = str(tmp_path / "small")
    prepare_corpus([str(shard)], prefix, progress=False)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        build_gpt_datasets(prefix, tokenizer, seq_length=4096, num_samples=(1, 0, 0))
    stats = json.loads(open(prefix + ".stats.json").read())
    stats["vocab_size"] = 50257
    open(prefix + ".stats.json", "w").write(json.dumps(stats))
    with pytest.raises(ValueError, match="50257-token vocabulary"):
        build_gpt_datasets(prefix, tokenizer, seq_length=4, num_samples=(1, 0, 0))
