"""Data: text to Megatron indexed datasets, the default tokenizer and offline corpus, GPT datasets."""

from megatron_simreg.data.datasets import build_gpt_datasets, check_indexed_dataset
from megatron_simreg.data.offline_corpus import write_offline_corpus
from megatron_simreg.data.prepare import CorpusStats, prepare_corpus
from megatron_simreg.data.tokenizer import build_tokenizer, default_tokenizer_path

__all__ = [
    "CorpusStats",
    "build_gpt_datasets",
    "build_tokenizer",
    "check_indexed_dataset",
    "default_tokenizer_path",
    "prepare_corpus",
    "write_offline_corpus",
]
