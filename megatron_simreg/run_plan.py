"""What a run derives from its config, computed once: both training loops and `--dry-run` read the same plan.

    plan = plan_run(cfg, world_size)   # checks everything a launch can get wrong, before any process starts

The plan holds the derived sizes (data-parallel size, micro-batches per step, training iterations, tokens
per step), the schedule in samples, the learning-rate floor, the tokenizer (path, kind, vocabulary) and the
padded vocabulary, the checkpoint folders, and what the checkpoint a run resumes from was trained with
(resume.py). Every check a launch needs runs here, so megatron.training on GPUs, the local loop on
CPU and the dry run refuse the same configs with the same message.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_simreg.config import DATA_PREFIX_EXAMPLE, Config, ConfigError, check_layout

if TYPE_CHECKING:
    from megatron_simreg.resume import SavedProgress

MEGATRON_TOKENIZER_TYPES = {"sentencepiece": "SentencePieceTokenizer", "huggingface": "HuggingFaceTokenizer"}


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    data_parallel: int
    micro_batches: int  # per optimizer step and data-parallel rank
    train_iters: int  # the iteration training ends at
    global_batch_size: int
    tokens_per_iter: int
    warmup_samples: int  # the learning-rate schedule, in samples as Megatron counts it
    decay_samples: int
    train_samples: int  # consumed when training ends
    evaluation_samples: int  # one evaluation's eval_iters global batches: the fixed sample every evaluation scores
    min_lr: float
    tokenizer_path: str
    tokenizer_library: str  # "sentencepiece" (a model file) or "huggingface" (a folder)
    vocab_size: int  # the tokenizer's
    padded_vocab_size: int  # the embedding's rows: model.vocab_size padded for tensor parallelism
    save_dir: str
    load_dir: str
    resumed: SavedProgress | None  # the checkpoint this run resumes from
    finetune: bool = False  # this launch loads only the weights of load_dir (checkpoint.finetune) and starts at 0

    @property
    def megatron_tokenizer_type(self) -> str:
        return MEGATRON_TOKENIZER_TYPES[self.tokenizer_library]

    @property
    def batch_size_change(self) -> str | None:
        """One line for a resume with another global batch size: what stays, and where the run now ends."""
        r = self.resumed
        if r is None or r.global_batch_size == self.global_batch_size:
            return None
        return (f"resuming from iteration {r.iteration} ({r.consumed_samples} samples) with training.global_batch_size "
                f"{r.global_batch_size} -> {self.global_batch_size}: the schedule stays in samples (warm-up "
                f"{self.warmup_samples}, decay {self.decay_samples}); training ends at iteration {self.train_iters} "
                f"({self.train_samples} samples)")

    @property
    def finetune_start(self) -> str | None:
        """One line for a run that starts from another checkpoint's weights."""
        return f"starting from the weights of {self.load_dir} (finetune)" if self.finetune else None


def padded_vocab_size(cfg: Config) -> int:
    """model.vocab_size padded so the embedding splits evenly over tensor-parallel ranks (as Megatron pads)."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor
    return -(-cfg.model.vocab_size // multiple) * multiple


def train_iters(cfg: Config, global_batch_size: int | None = None) -> int:
    """schedule.train_iters, or schedule.train_tokens in whole steps of the global batch (training's, or another)."""
    tokens_per_iter = (global_batch_size or cfg.training.global_batch_size) * cfg.model.seq_length
    return cfg.schedule.train_iters or math.ceil(cfg.schedule.train_tokens / tokens_per_iter)


def min_lr(cfg: Config) -> float:
    """optimizer.min_lr, or one tenth of the peak (the paper's cosine floor)."""
    return cfg.optimizer.min_lr if cfg.optimizer.min_lr is not None else cfg.optimizer.lr / 10


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """The run's derived settings on `world_size` processes; ConfigError names whatever cannot work.

    Resuming, the config's iteration counts (warm-up, length) are steps of the global batch the checkpoint's run
    started with, converted to samples once: a resume with another batch keeps warm-up, decay and the end in samples
    and takes as many steps of the new batch as the samples left need (the last one may pass the end). Changing
    schedule.train_iters as well ends the run after train_iters x (that first batch) samples.
    """
    from megatron_simreg.checkpoint import check_holds_checkpoint, chosen_iteration
    from megatron_simreg.data import build_tokenizer, default_tokenizer_path
    from megatron_simreg.data.tokenizer import NotATokenizer, tokenizer_library
    from megatron_simreg.resume import (
        check_adagc_state,
        check_same_model,
        check_same_precision,
        check_same_regularizer,
        saved_progress,
    )

    if not cfg.data.prefix:
        raise ConfigError(f"data.prefix is empty: name the indexed dataset(s) to train on, {DATA_PREFIX_EXAMPLE}")
    data_parallel = check_layout(cfg, world_size)
    t = cfg.training
    save_dir = cfg.checkpoint.save or os.path.join(cfg.run_dir, "checkpoints")
    load_dir = cfg.checkpoint.load or save_dir
    check_holds_checkpoint(cfg.checkpoint.load, "checkpoint.load=")
    finetune = cfg.checkpoint.finetune and chosen_iteration(save_dir, None) is None  # else resume its own saves
    if cfg.checkpoint.finetune and os.path.abspath(save_dir) == os.path.abspath(load_dir):
        raise ConfigError(f"checkpoint.finetune starts a new run from checkpoint.load={load_dir}, which is also where "
                          "it would save: set logging.run_dir (or checkpoint.save) to another folder")
    if cfg.checkpoint.finetune and not finetune:
        load_dir = save_dir
    resumed = saved_progress(load_dir, chosen_iteration(load_dir, cfg.checkpoint.load_iteration))
    check_same_model(cfg, resumed)
    if finetune:
        resumed = None  # weights only: the schedule and the data start from 0
    check_same_precision(cfg, resumed)
    check_same_regularizer(cfg, resumed)
    check_adagc_state(cfg, resumed)
    batch = resumed.global_batch_size if resumed is not None else t.global_batch_size  # the unit of the iterations
    iters = train_iters(cfg, batch)
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
    start, consumed = (resumed.iteration, resumed.consumed_samples) if resumed is not None else (0, 0)
    steps = max(0, math.ceil((iters * batch - consumed) / t.global_batch_size))  # the steps left, of today's batch
    return RunPlan(
        world_size=world_size,
        data_parallel=data_parallel,
        micro_batches=t.global_batch_size // (t.micro_batch_size * data_parallel),
        train_iters=start + steps,
        global_batch_size=t.global_batch_size,
        tokens_per_iter=t.global_batch_size * cfg.model.seq_length,
        warmup_samples=cfg.schedule.warmup_steps * batch,
        decay_samples=iters * batch,
        train_samples=consumed + steps * t.global_batch_size,
        evaluation_samples=t.eval_iters * t.global_batch_size,
        min_lr=min_lr(cfg),
        tokenizer_path=tokenizer_path,
        tokenizer_library=library,
        vocab_size=vocab_size,
        padded_vocab_size=padded,
        save_dir=save_dir,
        load_dir=load_dir,
        resumed=resumed,
        finetune=finetune,
    )
