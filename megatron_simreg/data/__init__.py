"""Data: text to Megatron indexed datasets, the default tokenizer and offline corpus, GPT datasets.

    tokenizer = build_tokenizer()                                  # LLaMA-style 32k, from mistral-common
    corpus = write_offline_corpus("data/demo")                     # Gutenberg texts in C4's format
    prepare_corpus([corpus], "data/demo/gutenberg_text_document")  # .bin/.idx/.stats.json
    train, valid, test = build_gpt_datasets("data/demo/gutenberg_text_document", tokenizer, 512, (1000, 100, 0))
"""

from megatron_simreg.data.datasets import (
    build_gpt_datasets,
    build_run_datasets,
    check_indexed_dataset,
    dataset_prefixes,
)
from megatron_simreg.data.offline_corpus import write_offline_corpus
from megatron_simreg.data.prepare import CorpusStats, prepare_corpus
from megatron_simreg.data.tokenizer import build_tokenizer, default_tokenizer_path

__all__ = [
    "CorpusStats",
    "build_gpt_datasets",
    "build_run_datasets",
    "build_tokenizer",
    "check_indexed_dataset",
    "dataset_prefixes",
    "default_tokenizer_path",
    "prepare_corpus",
    "write_offline_corpus",
]
