"""Hugging Face tokenizer files that encode exactly as training did.

Training encodes with SentencePiece itself (`encode_as_ids`, no BOS). transformers' conversion of a
SentencePiece BPE model does not reproduce it: it ranks merges by piece id where SentencePiece ranks them by
score, and LLaMA-style models give every whitespace-only piece ("▁▁", "▁▁▁▁", ...) a low id but the lowest
score. SentencePiece therefore merges a run of spaces last, after its final "▁" has joined the word ("▁▁▁"
"▁ind" "ented" for four spaces and "indented"); the conversion merges the spaces first ("▁▁▁▁" "indent" "ed").
Its Metaspace pre-tokenizer also adds no dummy prefix to text that starts with a space. Code and double spaces
then reach the model as ids it never saw.

What SentencePiece does (google/sentencepiece src/normalizer.cc, src/bpe_model.cc, src/sentencepiece_processor.cc):
1. Normalise: the model's character map if any; with `remove_extra_whitespaces`, no leading, trailing or
   repeated spaces; one "▁" before non-empty text (`add_dummy_prefix`); every " " becomes "▁".
2. Merge over the whole string: start from single characters and repeatedly join the adjacent pair whose
   concatenation is a piece of highest score, the leftmost one among equal scores. A character that is no
   piece becomes its UTF-8 byte pieces (`byte_fallback`), else one <unk> per run.
3. Decode: "▁" -> " ", byte pieces joined, <unk> shown as the model's unk_surface, the first piece's
   leading "▁" dropped.

The same pipeline from the `tokenizers` library's components:
- normalizer: Precompiled (the character map), Replace and Prepend, as step 1;
- pre-tokenizer: Split into words, each a run of "▁" and the characters up to the next "▁". No piece has a
  character followed by "▁" (checked), so no merge crosses those boundaries;
- model: BPE with byte fallback and one merge for every way a piece splits into two pieces, ranked by the
  piece's score. `tokenizers` breaks ties between equal ranks by position, as SentencePiece does between equal
  scores, but gives every merge its own rank, so merges of equal score (the whitespace runs) need an order:
  the longer right part first, then the longer left part. SentencePiece merges a run of spaces from the left:
  the piece grown at the left takes its neighbour when their concatenation is a piece, and only otherwise do
  two single spaces further right start a new one. That order ranks (grown, neighbour) before (neighbour, "▁")
  before ("▁", "▁"), so `tokenizers` takes the same pair at every step (15 spaces with Mistral's pieces:
  14 + 1; the tests check every run up to 200 spaces);
- decoder: Replace, ByteFallback, Fuse, and Strip of the one dummy-prefix space.
The merge list is derived here by hand because no library derives it faithfully (transformers' converter is
the one that differs). `write_tokenizer` checks the written folder, loaded with `AutoTokenizer` as users and
lm-eval load it, against training's tokenizer on `PROBE` before the export completes.

Defaults of the written tokenizer: `tokenizer(text).input_ids` are training's ids (no BOS, no EOS; pass
`add_bos_token=True` to `from_pretrained` for a BOS), and special-token strings in text ("</s>") are encoded
as text, as SentencePiece encodes them (`split_special_tokens`). transformers 5 has no slow (SentencePiece)
Llama tokenizer; `tokenizer.model` beside it is the training model itself, for SentencePiece users.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

SPACE = "\u2581"  # SentencePiece's "▁"

# Texts where a different pipeline shows: runs of spaces (every length up to 64, at the start, before words,
# newlines and digits, at the end), tabs, code, digits, accents, CJK, emoji, characters that need byte
# fallback, special-token strings, the empty string.
PROBE = [
    "", " ", "a", "  two spaces", "trailing spaces  ", "line one\n    indented line", "\tone tab\t\ttwo tabs",
    "a\n\n\nb\r\n", "def f(x):\n    return [i ** 2 for i in range(10)]  # squares\n",
    "Pi is 3.14159, e is 2,718; 1234567890.", "café naïve Ærøskøbing façade", "中文 日本語の文章 한국어 문장",
    "emoji 🙂🚀👩‍👩‍👧 end", "rare \x00\x07\x7f \u200b\u2028\U0001d11e \ufeff", "<s> </s> <unk> <0x0A>",
] + [f"{' ' * n}{tail}" for n in range(65) for tail in ("word", "\n1", "", "x  y")]


def write_tokenizer(tokenizer_path: str, folder: str) -> None:
    """Tokenizer files in `folder` that load with `AutoTokenizer` and encode as training's `build_tokenizer`.

    A SentencePiece model gets tokenizer.json (built here), tokenizer_config.json and a copy of itself; a Hugging
    Face folder is copied, with BOS and EOS switched off as training's encoding has them. Written into a model
    folder whose config.json already exists, since that config steers `AutoTokenizer`.
    """
    if os.path.isdir(tokenizer_path):
        for path in glob.glob(os.path.join(tokenizer_path, "*")):
            if os.path.isfile(path) and not path.endswith((".safetensors", ".bin")):
                shutil.copy(path, folder)
        _update_json(os.path.join(folder, "tokenizer_config.json"), add_bos_token=False, add_eos_token=False)
    else:
        proto = _load_proto(tokenizer_path)
        sentencepiece_bpe_tokenizer(proto).save(os.path.join(folder, "tokenizer.json"))
        shutil.copy(tokenizer_path, os.path.join(folder, "tokenizer.model"))
        spec = proto.trainer_spec
        special = {name: getattr(spec, f"{name}_piece") for name in ("unk", "bos", "eos", "pad")
                   if getattr(spec, f"{name}_id") >= 0}
        _update_json(os.path.join(folder, "tokenizer_config.json"), tokenizer_class="PreTrainedTokenizerFast",
                     add_bos_token=False, add_eos_token=False, split_special_tokens=True,
                     clean_up_tokenization_spaces=False, **{f"{name}_token": piece for name, piece in special.items()})
    check_parity(tokenizer_path, folder)


def check_parity(tokenizer_path: str, folder: str, texts: list[str] = PROBE) -> None:
    """Raise unless `AutoTokenizer.from_pretrained(folder)` gives training's ids and decoding for every text."""
    from transformers import AutoTokenizer

    from megatron_simreg.data import build_tokenizer

    ours, theirs = build_tokenizer(tokenizer_path), AutoTokenizer.from_pretrained(folder)
    from_folder = os.path.isdir(tokenizer_path)  # then both decode with the same transformers class
    for text in texts:
        expected, ids = list(ours.tokenize(text)), theirs(text).input_ids
        if ids != expected or not from_folder and theirs.decode(ids) != ours.detokenize(expected):
            fix = ("give its tokenizer_config.json the tokenizer_class that training loaded" if from_folder else
                   "this SentencePiece model needs what hf_tokenizer.py does not emulate; report it with the model")
            raise ValueError(
                f"the exported tokenizer in {folder} encodes or decodes {text!r} unlike training's {tokenizer_path} "
                f"({theirs.convert_ids_to_tokens(ids)} against {theirs.convert_ids_to_tokens(expected)}): {fix}"
            )


def sentencepiece_bpe_tokenizer(proto):
    """A `tokenizers.Tokenizer` that encodes and decodes as the SentencePiece BPE model `proto` (a ModelProto)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    _check_supported(proto)
    piece_type = type(proto.pieces[0])
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == piece_type.NORMAL}
    ranked = sorted(
        ((-score, -len(right), -len(left)), left, right)
        for piece, score in scores.items()
        for left, right in ((piece[:k], piece[k:]) for k in range(1, len(piece)))
        if left in scores and right in scores
    )
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for _, left, right in ranked],
                                     unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                                     byte_fallback=proto.trainer_spec.byte_fallback))
    tokenizer.normalizer = _normalizer(proto.normalizer_spec)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), "isolated")
    spec = proto.trainer_spec
    steps = [decoders.Replace(spec.unk_piece, spec.unk_surface), decoders.Replace(SPACE, " "),
             decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                                  if p.type in (piece_type.CONTROL, piece_type.UNKNOWN)])
    return tokenizer


def _normalizer(spec):
    from tokenizers import Regex, normalizers

    charsmap = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    prefix = [normalizers.Prepend(" ")] if spec.add_dummy_prefix else []  # Prepend leaves empty text empty
    if spec.remove_extra_whitespaces:  # the prefix goes on what is left once the spaces are gone
        steps = charsmap + [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
        steps += prefix
    else:  # the prefix goes on any non-empty input, even one the character map empties
        steps = prefix + charsmap
    return normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])


def _check_supported(proto) -> None:
    piece_type = type(proto.pieces[0])
    normal = [p.piece for p in proto.pieces if p.type == piece_type.NORMAL]
    pieces = set(normal)
    problems = {
        "it is not a BPE model": proto.trainer_spec.model_type != type(proto.trainer_spec).BPE,
        "it has user-defined or unused pieces": any(p.type in (piece_type.USER_DEFINED, piece_type.UNUSED)
                                                    for p in proto.pieces),
        "it treats whitespace as a suffix": proto.trainer_spec.treat_whitespace_as_suffix,
        "it does not escape whitespace": not proto.normalizer_spec.escape_whitespaces,
        "it has decoding rules": bool(proto.denormalizer_spec.precompiled_charsmap),
        "a piece has '▁' after another character": any(SPACE in p.lstrip(SPACE) for p in normal),
        "a piece has a character that is no piece": any(c not in pieces for p in normal for c in p),
    }
    found = [reason for reason, present in problems.items() if present]
    if found:
        raise ValueError(
            f"cannot write a Hugging Face tokenizer that encodes as this SentencePiece model: {'; '.join(found)}. "
            "Train with a SentencePiece BPE model without these, or with a Hugging Face folder as data.tokenizer"
        )


def _load_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _update_json(path: str, **values) -> None:
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **values}, f, indent=2, ensure_ascii=False)
