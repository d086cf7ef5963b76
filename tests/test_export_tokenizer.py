"""The exported tokenizer encodes as training did.

Loaded from the exported folder the way users and lm-eval load it (`AutoTokenizer.from_pretrained`, lm-eval's
`hf` model), it gives SentencePiece's ids and decodes them back to the text: for the default model, for
SentencePiece models trained here with LLaMA's settings (whitespace pieces with their own scores, and tied at
the lowest score as in LLaMA's tokenizer.model) and with SentencePiece's defaults (NFKC, extra spaces removed,
no byte fallback), and for a Hugging Face folder passed as data.tokenizer. The texts: whitespace runs (spaces,
tabs, newlines, leading, trailing, double), code, digits, accents, CJK, emoji, characters that need byte
fallback, special-token strings, the empty string, and the source of four stdlib modules line by line.
"""

import ast
import difflib
import inspect
import io
import json
import pathlib
import textwrap
import tokenize

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from megatron_simreg.data import build_tokenizer, default_tokenizer_path
from megatron_simreg.export_hf import _write_tokenizer
from megatron_simreg.hf_tokenizer import SPACE, sentencepiece_bpe_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "", " ", "  ", "a", " a", "  two spaces", "double  spaces  inside", "trailing  ", " starts with a space",
    "line one\n    indented line", "\tone tab\t\ttwo tabs\t", "mixed \t \n  \n\n whitespace", "a\r\nb\rc\n",
    "\n\nleading newlines", "class A:\n\tdef g(self):\n\t\tpass\n",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(10)]  # squares\n    return None\n",
    "Digits 0123456789, 3.14159, 2,718, -42, 1e-9, 10000000000",
    "café naïve Ærøskøbing façade Zürich São Paulo", "e\u0301 (a combining accent)", "中文 日本語の文章 한국어 문장",
    "emoji 🙂🚀, a family 👩\u200d👩\u200d👧, a flag 🇫🇷",
    "rare: \x00\x07\x7f \u200b\u2028 \U0001d11e \ufeff \U0010fffd ᚠ ꙮ",
    "special strings <s> </s> <unk> <0x0A>",
] + [" " * n + tail for n in range(200) for tail in ("word", "\n", "", "x  y")]
SOURCES = [inspect.getsource(module) for module in (textwrap, difflib, tokenize, ast)]
CODE = SOURCES + [line for source in SOURCES for line in source.splitlines()] + [
    ast.get_docstring(node, clean=False) for source in SOURCES for node in ast.walk(ast.parse(source))
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)
]
CORPUS = TEXTS + CODE
TINY = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def export_tokenizer(tokenizer_path, folder, vocab_size=32000, weights=False):
    """The tokenizer part of tools/export_hf.py, beside a tiny model: the model's config steers AutoTokenizer."""
    config = transformers.LlamaConfig(vocab_size=vocab_size, **TINY)
    (transformers.LlamaForCausalLM(config) if weights else config).save_pretrained(folder)
    _write_tokenizer(tokenizer_path, str(folder))
    return str(folder)


def differences(encode, reference, texts, decode=None, decoded=None):
    """The texts whose ids (or decoded text) differ from the reference's; each side encodes a list of texts."""
    ids, expected = encode(texts), reference(texts)
    shown = decode(ids) if decode else texts
    wanted = decoded(expected) if decoded else texts
    rows = zip(texts, ids, expected, shown, wanted, strict=True)
    return [(text[:80], a[:20], b[:20], c[:80]) for text, a, b, c, d in rows if a != b or c != d]


def each(encode):
    return lambda texts: [list(encode(text)) for text in texts]


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    return export_tokenizer(default_tokenizer_path(), tmp_path_factory.mktemp("hf"), weights=True)  # for lm-eval


def test_default_tokenizer_encodes_and_decodes_as_sentencepiece(default_export):
    sp = spm.SentencePieceProcessor(model_file=default_tokenizer_path())
    assert all(SPACE not in text for text in CORPUS)  # SentencePiece reads a literal "▁" as a space
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_export)
    assert differences(lambda t: tokenizer(t).input_ids, sp.encode, CORPUS, tokenizer.batch_decode) == []
    assert tokenizer("line one\n    indented line").tokens() == ["▁line", "▁one", "<0x0A>", "▁▁▁", "▁ind", "ented",
                                                                 "▁line"]
    training = build_tokenizer()
    assert differences(each(training.tokenize), sp.encode, TEXTS) == []
    assert differences(lambda t: tokenizer(t, add_special_tokens=False).input_ids, sp.encode, TEXTS) == []
    assert differences(each(lambda t: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t))), sp.encode, TEXTS) == []
    with_bos = transformers.AutoTokenizer.from_pretrained(default_export, add_bos_token=True)
    assert differences(lambda t: with_bos(t).input_ids, each(lambda t: [sp.bos_id()] + sp.encode(t)), TEXTS) == []
    assert tokenizer.convert_ids_to_tokens([sp.unk_id(), sp.bos_id(), sp.eos_id()]) == ["<unk>", "<s>", "</s>"]


def test_lm_eval_encodes_as_training(default_export):
    from lm_eval.models.huggingface import HFLM

    sp = spm.SentencePieceProcessor(model_file=default_tokenizer_path())
    model = HFLM(pretrained=default_export, device="cpu", batch_size=1)
    assert differences(each(model.tok_encode), sp.encode, TEXTS) == []
    model = HFLM(pretrained=default_export, device="cpu", batch_size=1, add_bos_token=True)
    assert differences(each(model.tok_encode), each(lambda t: [sp.bos_id()] + sp.encode(t)), TEXTS[1:]) == []


@pytest.mark.parametrize("add_bos_token", [False, True], ids=["saved", "bos-by-default"])
def test_hugging_face_folder_passed_as_data_tokenizer(default_export, add_bos_token, tmp_path):
    """A folder saved from the faithful tokenizer; like LLaMA-2's Hugging Face folder it may add BOS by default."""
    source = tmp_path / "tokenizer"
    transformers.AutoTokenizer.from_pretrained(default_export).save_pretrained(source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": add_bos_token}))
    training = build_tokenizer(str(source))
    exported = transformers.AutoTokenizer.from_pretrained(export_tokenizer(str(source), tmp_path / "hf"))
    encode = each(training.tokenize)
    assert differences(lambda t: exported(t).input_ids, encode, TEXTS + SOURCES, exported.batch_decode) == []
    sp = spm.SentencePieceProcessor(model_file=default_tokenizer_path())
    assert differences(each(training.tokenize), sp.encode, TEXTS) == []


def train_sentencepiece(path, whitespace_score=None, **settings):
    lines = [line for source in SOURCES for line in source.splitlines()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=1000,
                                   model_type="bpe", minloglevel=2, **settings)
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    for piece in proto.pieces:
        if whitespace_score is not None and len(piece.piece) > 1 and set(piece.piece) == {SPACE}:
            piece.score = whitespace_score
    path.write_bytes(proto.SerializeToString())
    return str(path)


LLAMA = {"byte_fallback": True, "allow_whitespace_only_pieces": True, "split_digits": True,
         "normalization_rule_name": "identity", "remove_extra_whitespaces": False}


@pytest.mark.parametrize("whitespace_score, settings", [
    (None, LLAMA), (-1e9, LLAMA), (None, {}),
], ids=["llama-settings", "llama-whitespace-scores", "sentencepiece-defaults"])
def test_other_sentencepiece_models_encode_and_decode_as_sentencepiece(whitespace_score, settings, tmp_path):
    model = train_sentencepiece(tmp_path / "tokenizer.model", whitespace_score, **settings)
    sp = spm.SentencePieceProcessor(model_file=model)
    exported = transformers.AutoTokenizer.from_pretrained(export_tokenizer(model, tmp_path / "hf", sp.vocab_size()))
    texts = CORPUS + ["ＡＢＣ ﬁ ① \u3000 full-width", "\u200b", " \u200b "]
    assert differences(lambda t: exported(t).input_ids, sp.encode, texts, exported.batch_decode, sp.decode) == []


def test_sentencepiece_models_it_cannot_emulate_are_refused():
    proto = sentencepiece_model_pb2.ModelProto.FromString(pathlib.Path(default_tokenizer_path()).read_bytes())
    proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM
    proto.pieces.add(piece="a" + SPACE + "b", score=-1.0)
    with pytest.raises(ValueError, match=r"it is not a BPE model; a piece has '▁' after another character\. "):
        sentencepiece_bpe_tokenizer(proto)
