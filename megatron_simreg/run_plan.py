"""What a run derives from its config, computed once: both training loops and `--dry-run` read the same plan.

    plan = plan_run(cfg, world_size)   # checks everything a launch can get wrong, before any process starts

The plan holds the derived sizes (data-parallel size, micro-batches per step, training iterations, tokens
per step), the learning-rate floor, the tokenizer (path, kind, vocabulary) and the padded vocabulary, and the
checkpoint folders. Every check a launch needs runs here, so megatron.training on GPUs, the local loop on
CPU and the dry run refuse the same configs with the same message.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from megatron_simreg.config import DATA_PREFIX_EXAMPLE, Config, ConfigError, check_layout

MEGATRON_TOKENIZER_TYPES = {"sentencepiece": "SentencePieceTokenizer", "huggingface": "HuggingFaceTokenizer"}


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    data_parallel: int
    micro_batches: int  # per optimizer step and data-parallel rank
    train_iters: int
    tokens_per_iter: int
    min_lr: float
    tokenizer_path: str
    tokenizer_library: str  # "sentencepiece" (a model file) or "huggingface" (a folder)
    vocab_size: int  # the tokenizer's
    padded_vocab_size: int  # the embedding's rows: model.vocab_size padded for tensor parallelism
    save_dir: str
    load_dir: str

    @property
    def megatron_tokenizer_type(self) -> str:
        return MEGATRON_TOKENIZER_TYPES[self.tokenizer_library]


def padded_vocab_size(cfg: Config) -> int:
    """model.vocab_size padded so the embedding splits evenly over tensor-parallel ranks (as Megatron pads)."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor
    return -(-cfg.model.vocab_size // multiple) * multiple


def train_iters(cfg: Config) -> int:
    """schedule.train_iters, or schedule.train_tokens in whole steps of the global batch."""
    tokens_per_iter = cfg.training.global_batch_size * cfg.model.seq_length
    return cfg.schedule.train_iters or math.ceil(cfg.schedule.train_tokens / tokens_per_iter)


def min_lr(cfg: Config) -> float:
    """optimizer.min_lr, or one tenth of the peak (the paper's cosine floor)."""
    return cfg.optimizer.min_lr if cfg.optimizer.min_lr is not None else cfg.optimizer.lr / 10


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """The run's derived settings on `world_size` processes; ConfigError names whatever cannot work."""
    from megatron_simreg.data import build_tokenizer, default_tokenizer_path
    from megatron_simreg.data.tokenizer import NotATokenizer, tokenizer_library

    if not cfg.data.prefix:
        raise ConfigError(f"data.prefix is empty: name the indexed dataset(s) to train on, {DATA_PREFIX_EXAMPLE}")
    data_parallel = check_layout(cfg, world_size)
    t = cfg.training
    iters = train_iters(cfg)
    if cfg.schedule.warmup_steps >= iters:
        raise ConfigError(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} must be smaller than the {iters} training iterations"
        )
    tokenizer_path = cfg.data.tokenizer or default_tokenizer_path()
    try:
        library = tokenizer_library(tokenizer_path)
        vocab_size = build_tokenizer(tokenizer_path).vocab_size
    except NotATokenizer as error:
        raise ConfigError(f"data.tokenizer={error}") from None
    except (FileNotFoundError, ImportError, ValueError) as error:
        raise ConfigError(f"data.tokenizer: {error}") from error
    padded = padded_vocab_size(cfg)
    if padded < vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} (padded to {padded}) is smaller than the tokenizer's "
            f"{vocab_size} tokens ({tokenizer_path}): set model.vocab_size={vocab_size}, "
            "or ids beyond the embedding would be zeroed (tensor parallelism) or crash the GPU (one rank)"
        )
    save_dir = cfg.checkpoint.save or os.path.join(cfg.run_dir, "checkpoints")
    return RunPlan(
        world_size=world_size,
        data_parallel=data_parallel,
        micro_batches=t.global_batch_size // (t.micro_batch_size * data_parallel),
        train_iters=iters,
        tokens_per_iter=t.global_batch_size * cfg.model.seq_length,
        min_lr=min_lr(cfg),
        tokenizer_path=tokenizer_path,
        tokenizer_library=library,
        vocab_size=vocab_size,
        padded_vocab_size=padded,
        save_dir=save_dir,
        load_dir=cfg.checkpoint.load or save_dir,
    )
