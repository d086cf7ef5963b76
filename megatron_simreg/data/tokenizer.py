"""Tokenizers as megatron-core objects (vocab_size, eod, tokenize, detokenize, unique_identifiers), no hub.

The default is the LLaMA-style 32k SentencePiece model shipped inside the `mistral-common` package
(`mistral_common/data/tokenizer.model.v1`, Apache-2.0); for the paper's reproduction pass the LLaMA-2
`tokenizer.model`. A folder is read as a Hugging Face tokenizer (needs `transformers`). Either way a
document becomes its tokens without BOS, so both kinds of the same model write the same ids.
"""

from __future__ import annotations

import importlib.util
import os

from megatron.core.tokenizers import MegatronTokenizer


def default_tokenizer_path() -> str:
    """The LLaMA-style 32k SentencePiece model inside the installed `mistral-common` package."""
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the default tokenizer {path} is missing from the installed mistral-common; "
            "reinstall it (pip install mistral_common==1.13.1) or pass a SentencePiece model with --tokenizer"
        )
    return path


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class NotATokenizer(ValueError):
    """A file or folder that exists but holds no tokenizer; the message starts with its path."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} is neither a sentencepiece model file nor a Hugging Face tokenizer folder "
                         f"({' / '.join(HF_TOKENIZER_FILES)}): {reason}")


def tokenizer_library(path: str) -> str:
    """'sentencepiece' for a model file, 'huggingface' for a folder; a clear error for anything else."""
    if os.path.isfile(path):
        return "sentencepiece"
    if os.path.isdir(path):
        if importlib.util.find_spec("transformers") is None:
            raise ImportError(
                f"{path} is a Hugging Face tokenizer folder, which needs `transformers`: "
                "pip install 'megatron-simreg[eval]' (or transformers), or pass a SentencePiece .model file"
            )
        if not any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES):
            raise NotATokenizer(path, f"the folder holds neither {' nor '.join(HF_TOKENIZER_FILES)}")
        return "huggingface"
    raise FileNotFoundError(
        f"tokenizer {path!r} not found: pass a SentencePiece .model file (the LLaMA-2 tokenizer.model), "
        "a Hugging Face tokenizer folder, or nothing for the default LLaMA-style 32k model"
    )


def build_tokenizer(path_or_name: str | None = None):
    """A megatron-core tokenizer from a SentencePiece model file, a Hugging Face folder, or the default (None)."""
    path = path_or_name or default_tokenizer_path()
    library = tokenizer_library(path)
    # Hugging Face tokenizers add BOS by default; SentencePiece files do not. Documents are BOS-free here.
    options = {"include_special_tokens": False} if library == "huggingface" else {}
    try:
        tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=path, metadata_path={"library": library},
                                                      **options)
    except (RuntimeError, ValueError, OSError) as error:  # sentencepiece's and transformers' own, several lines long
        raise NotATokenizer(path, str(error).splitlines()[0]) from error
    if tokenizer.eod is None or tokenizer.eod < 0:
        raise ValueError(f"tokenizer {path} has no end-of-document token (eos); pick one that does")
    return tokenizer
