"""build_gpt_datasets: train/valid/test GPTDatasets from prepared data, blends, process groups, bad input.

Samples are checked against SentencePiece's own ids of the documents: every window of a sample is made
of whole documents of its split between EODs, cut only at its two ends.
"""

import json
import sys

import numpy
import pytest
import sentencepiece
from distributed import run_distributed
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

from megatron_simreg.data import (
    build_gpt_datasets,
    build_tokenizer,
    dataset_prefixes,
    default_tokenizer_path,
    prepare_corpus,
)

# 60 distinct documents of 3 to 41 words; "80,20,0" puts documents 0-47 in train and 48-59 in valid.
DOCUMENTS = [
    f"Document {i} says " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(3 + (i * 13) % 39)) for i in range(60)
]
SEQ = 32


@pytest.fixture(scope="module")
def reference():
    processor = sentencepiece.SentencePieceProcessor(model_file=default_tokenizer_path())
    return [processor.encode(text) for text in DOCUMENTS], processor.eos_id()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_corpus(folder, documents, name="corpus", **options):
    source = folder / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    prepare_corpus([str(source)], str(folder / name), progress=False, **options)
    return str(folder / name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), DOCUMENTS)


def windows(dataset):
    """Each sample's seq + 1 tokens: its inputs and the last label."""
    for index in range(len(dataset)):
        sample = dataset[index]
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert tokens.shape == labels.shape == (SEQ,)
        assert (labels[:-1] == tokens[1:]).all()  # labels are the next tokens
        assert (sample["loss_mask"].numpy() == 1).all() and (sample["position_ids"].numpy() == numpy.arange(SEQ)).all()
        yield [*tokens.tolist(), int(labels[-1])]


def assert_made_of(window, documents, eod):
    """Whole documents between EODs; a suffix of one at the start and a prefix of one at the end."""
    cuts = [i for i, token in enumerate(window) if token == eod]
    if not cuts:  # a stretch inside one document
        n = len(window)
        assert any(doc[i:i + n] == window for doc in documents for i in range(len(doc) - n + 1)), window
        return
    head, tail = window[:cuts[0]], window[cuts[-1] + 1:]
    assert not head or any(len(doc) >= len(head) and doc[len(doc) - len(head):] == head for doc in documents), window
    assert all(window[a + 1:b] in documents for a, b in zip(cuts, cuts[1:])), window
    assert not tail or any(doc[:len(tail)] == tail for doc in documents), window


def test_splits_and_samples_follow_the_documents(corpus, tokenizer, reference, tmp_path):
    ids, eod = reference
    train_tokens = sum(len(doc) + 1 for doc in ids[:48])
    valid_tokens = sum(len(doc) + 1 for doc in ids[48:])
    one_train_epoch, one_valid_epoch = (train_tokens - 1) // SEQ, (valid_tokens - 1) // SEQ
    train, valid, test = build_gpt_datasets(corpus, tokenizer, SEQ, (one_train_epoch, one_valid_epoch, 0),
                                            split="80,20,0", cache_dir=str(tmp_path / "cache"))
    assert test is None
    assert (len(train), len(valid)) == (one_train_epoch, one_valid_epoch)
    for window in windows(train):
        assert_made_of(window, ids[:48], eod)
    for window in windows(valid):
        assert_made_of(window, ids[48:], eod)

    # More samples than one epoch: further shuffled epochs; the same seed gives the same order.
    more, _, _ = build_gpt_datasets(corpus, tokenizer, SEQ, (3 * one_train_epoch, 0, 0), split="80,20,0",
                                    cache_dir=str(tmp_path / "cache"))
    again, _, _ = build_gpt_datasets(corpus, tokenizer, SEQ, (3 * one_train_epoch, 0, 0), split="80,20,0",
                                     cache_dir=str(tmp_path / "fresh_cache"))
    assert len(more) >= 3 * one_train_epoch
    assert all((more[i]["tokens"] == again[i]["tokens"]).all() for i in range(0, len(more), 7))


def test_sharded_prefix_and_weighted_blend(tmp_path, tokenizer):
    alpha = write_corpus(tmp_path, [" ".join(["alpha"] * (20 + i)) for i in range(40)], name="alpha")
    beta = write_corpus(tmp_path, [" ".join(["beta"] * (20 + i)) for i in range(40)], name="beta", shard_tokens=400)
    shards, weights = dataset_prefixes(beta)
    assert len(shards) > 2 and weights is None and all(shard.startswith(beta + "-") for shard in shards)

    prefixes, weights = dataset_prefixes(["30", alpha, "70", beta])
    assert prefixes == [alpha, *shards] and weights[0] == pytest.approx(0.3) and sum(weights) == pytest.approx(1.0)
    train, _, _ = build_gpt_datasets(["30", alpha, "70", beta], tokenizer, SEQ, (400, 0, 0), split="100,0,0",
                                     cache_dir=str(tmp_path / "cache"))
    alpha_ids = set(tokenizer.tokenize("alpha alpha")) - set(tokenizer.tokenize("beta beta"))
    from_alpha = sum(bool(alpha_ids & set(train[i]["tokens"].tolist())) for i in range(len(train)))
    # megatron's blending assigns samples greedily, keeping each dataset within a sample of its weight (1/400)
    assert len(train) >= 400 and from_alpha / len(train) == pytest.approx(0.3, abs=0.02)


def _samples_on_rank(rank, world_size, prefix, cache_dir):
    tokenizer = build_tokenizer()
    train, valid, _ = build_gpt_datasets(prefix, tokenizer, SEQ, (50, 10, 0), split="80,20,0", cache_dir=cache_dir)
    return (
        [train[i]["tokens"].tolist() for i in range(len(train))],
        [valid[i]["tokens"].tolist() for i in range(len(valid))],
    )


def test_ranks_of_a_process_group_build_the_same_samples(corpus, tmp_path):
    """Rank 0 builds the index cache, the other ranks read it; all see the samples one process sees."""
    ranks = run_distributed(_samples_on_rank, 2, corpus, str(tmp_path / "shared_cache"))
    alone = _samples_on_rank(0, 1, corpus, str(tmp_path / "own_cache"))
    assert ranks[0] == ranks[1] == alone and len(alone[0]) >= 50


def test_bad_input_is_explained(corpus, tokenizer, tmp_path, monkeypatch):
    with pytest.raises(
        FileNotFoundError, match=r"absent\.bin.*python tools/prepare_data.py .*--output-prefix .*absent"
    ):
        build_gpt_datasets(str(tmp_path / "absent"), tokenizer, SEQ, (1, 1, 0))
    with pytest.raises(ValueError, match="fewer than one sequence of 100000"):
        build_gpt_datasets(corpus, tokenizer, 100_000, (1, 0, 0))
    with pytest.raises(ValueError, match=r"the valid split \(split='99,1,0'\) .* gets 1 of its 60 documents"):
        build_gpt_datasets(corpus, tokenizer, 256, (10, 1, 0), split="99,1,0")

    # Data written with another vocabulary: told by the statistics file, or by the ids themselves.
    small = write_corpus(tmp_path, DOCUMENTS[:5], name="small")
    stats = json.loads(open(small + ".stats.json").read())
    open(small + ".stats.json", "w").write(json.dumps({**stats, "vocab_size": 50257}))
    with pytest.raises(ValueError, match="vocab_size=50257 .* the tokenizer now has vocab_size=32000"):
        build_gpt_datasets(small, tokenizer, 4, (1, 0, 0), split="100,0,0")
    foreign = str(tmp_path / "foreign")
    builder = IndexedDatasetBuilder(get_bin_path(foreign), dtype=numpy.int32)
    builder.add_document(numpy.array([5, 40000, 7, 2]), [4])
    builder.finalize(get_idx_path(foreign))
    with pytest.raises(ValueError, match="holds token id 40000, beyond the tokenizer's 32000-token vocabulary"):
        build_gpt_datasets(foreign, tokenizer, 2, (1, 0, 0), split="100,0,0")

    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)  # a build without the helpers
    with pytest.raises(ImportError, match="pip install pybind11 .* helpers.cpp"):
        build_gpt_datasets(corpus, tokenizer, SEQ, (1, 1, 0))


def test_truncated_data_files_are_named(tmp_path, tokenizer):
    """A .bin or .idx cut short (a full disk, an interrupted copy): the file is named and called truncated,
    checked against the sizes its index promises, before anything reads it."""
    import shutil

    prefix = write_corpus(tmp_path, DOCUMENTS)
    for path in (get_bin_path(prefix), get_idx_path(prefix)):
        whole = tmp_path / "whole"
        shutil.copy(path, whole)
        with open(path, "r+b") as f:
            f.truncate(len(whole.read_bytes()) - 3)
        with pytest.raises(
            ValueError, match=f"data file {path} is truncated: .* bytes, its (index|header) needs .*prepare_data"
        ):
            build_gpt_datasets(prefix, tokenizer, SEQ, (10, 2, 0), split="80,20,0")
        shutil.copy(whole, path)
    with open(get_idx_path(prefix), "r+b") as f:
        f.truncate(20)  # not even the header
    with pytest.raises(ValueError, match=f"data file {get_idx_path(prefix)} is truncated"):
        build_gpt_datasets(prefix, tokenizer, SEQ, (10, 2, 0), split="80,20,0")
