"""Tokenizers: the default 32k model from mistral-common, a Hugging Face folder of the same model, errors.

The reference is SentencePiece itself, called directly on the model file.
"""

import importlib.util
import json
import os

import pytest
import sentencepiece

from megatron_simreg.data import build_tokenizer, default_tokenizer_path, prepare_corpus

PROSE = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
    "Tabs\tand unicode: café, naïve, 東京, emoji 🙂.",
]
SPACED = "  two  spaces, a leading run"  # Hugging Face's conversion of SentencePiece models splits these differently


@pytest.fixture(scope="module")
def reference():
    return sentencepiece.SentencePieceProcessor(model_file=default_tokenizer_path())


def test_default_tokenizer_is_the_packaged_llama_style_model(reference):
    import mistral_common

    path = default_tokenizer_path()
    assert path.startswith(os.path.dirname(mistral_common.__file__)) and path.endswith("tokenizer.model.v1")
    tokenizer = build_tokenizer()
    assert tokenizer.vocab_size == reference.get_piece_size() == 32000
    assert tokenizer.eod == reference.eos_id() == 2
    assert tokenizer.unique_identifiers["tokenizer_path"] == path  # what GPTDataset's cache keys hash
    for text in PROSE + [SPACED]:
        ids = tokenizer.tokenize(text)
        assert list(ids) == reference.encode(text)  # no BOS, exactly SentencePiece's ids
        assert tokenizer.detokenize(ids) == text


def test_hugging_face_folder_gives_the_same_ids_and_the_same_dataset(tmp_path, reference):
    import transformers  # pinned in requirements.txt; the Hugging Face path needs it

    source = tmp_path / "spm"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(open(default_tokenizer_path(), "rb").read())
    folder = tmp_path / "hf"
    transformers.LlamaTokenizer.from_pretrained(str(source)).save_pretrained(str(folder))

    hf = build_tokenizer(str(folder))
    assert (hf.vocab_size, hf.eod) == (32000, 2)
    for text in PROSE:
        assert list(hf.tokenize(text)) == reference.encode(text)
    # Whatever the conversion does, the data holds the ids the Hugging Face tokenizer itself gives, without BOS.
    direct = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert list(hf.tokenize(SPACED)) == direct(SPACED, add_special_tokens=False).input_ids

    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in PROSE))
    prepare_corpus([str(corpus)], str(tmp_path / "spm_data"), progress=False)
    prepare_corpus([str(corpus)], str(tmp_path / "hf_data"), tokenizer=str(folder), progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"spm_data{suffix}").read_bytes() == (tmp_path / f"hf_data{suffix}").read_bytes()


def test_missing_tokenizer_and_missing_transformers_are_explained(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="SentencePiece .model file"):
        build_tokenizer(str(tmp_path / "tokenizer.model"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="needs `transformers`"):
        build_tokenizer(str(tmp_path))
