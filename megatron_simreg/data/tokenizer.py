"""Tokenizers as megatron-core objects (vocab_size, eod, tokenize, detokenize), loaded without a hub.

The default is the LLaMA-style 32k SentencePiece model shipped inside the `mistral-common` package
(`mistral_common/data/tokenizer.model.v1`, Apache-2.0); for the paper's reproduction pass the LLaMA-2
`tokenizer.model`. A folder is read as a Hugging Face tokenizer (needs `transformers`).
"""

from __future__ import annotations

import os

from megatron.core.tokenizers import MegatronTokenizer


def default_tokenizer_path() -> str:
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the default tokenizer {path} is missing from the installed mistral-common; "
            "reinstall it (pip install mistral_common) or pass a SentencePiece model with --tokenizer"
        )
    return path


def build_tokenizer(path: str | None = None):
    """A megatron-core tokenizer from a SentencePiece model file, a Hugging Face folder, or the default."""
    path = path or default_tokenizer_path()
    if os.path.isdir(path):
        library = "huggingface"
    elif os.path.isfile(path):
        library = "sentencepiece"
    else:
        raise FileNotFoundError(
            f"tokenizer {path!r} not found: pass a SentencePiece .model file, a Hugging Face tokenizer folder, "
            "or nothing for the default LLaMA-style 32k model"
        )
    return MegatronTokenizer.from_pretrained(tokenizer_path=path, metadata_path={"library": library})
