"""The local training loop: the same providers, forward step and loss as megatron.training, on CPU.

It uses megatron-core for everything but the loop itself: the model provider, DistributedDataParallel,
the optimizer (AdamW) with AdaGC attached, the optimizer-parameter scheduler, the forward-backward
schedules (pipeline parallelism included). Around them: periodic validation, checkpoints with exact
resume, a progress bar, console logs, TensorBoard events and a metrics JSONL file in the run folder.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_simreg import parallel
from megatron_simreg.adagc import AdaGC
from megatron_simreg.batches import micro_batches, on_this_rank
from megatron_simreg.checkpoint import latest_iteration, load_checkpoint, save_checkpoint
from megatron_simreg.config import Config, ConfigError, save_config
from megatron_simreg.data import build_gpt_datasets, build_tokenizer
from megatron_simreg.megatron_adagc import attach_adagc
from megatron_simreg.metrics import MetricsWriter
from megatron_simreg.model import model_provider, padded_vocab_size
from megatron_simreg.objective import SimRegObjective, forward_step, reduce_reports


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (a NaN loss, say)."""


@dataclass
class Schedule:
    """Derived sizes of a run."""

    data_parallel: int
    micro_batches: int  # per optimizer step and data-parallel rank
    train_iters: int
    tokens_per_iter: int


def schedule_of(cfg: Config, data_parallel: int) -> Schedule:
    t = cfg.training
    micro = t.global_batch_size // (t.micro_batch_size * data_parallel)
    tokens_per_iter = t.global_batch_size * cfg.model.seq_length
    iters = cfg.train_iters
    if cfg.schedule.warmup_steps >= iters:
        raise ConfigError(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} must be smaller than the {iters} training iterations"
        )
    return Schedule(data_parallel, micro, iters, tokens_per_iter)


def build_model_and_optimizer(cfg: Config):
    pre, post = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = model_provider(cfg, pre_process=pre, post_process=post)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr if o.min_lr is not None else o.lr / 10,
            weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=cfg.training.precision == "bf16",
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        [ddp],
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    model.config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer


def build_scheduler(cfg: Config, optimizer, schedule: Schedule) -> OptimizerParamScheduler:
    """Linear warm-up then cosine to min_lr, counted in samples as Megatron does."""
    o, gbs = cfg.optimizer, cfg.training.global_batch_size
    min_lr = o.min_lr if o.min_lr is not None else o.lr / 10
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=min_lr,
        lr_warmup_steps=cfg.schedule.warmup_steps * gbs, lr_decay_steps=schedule.train_iters * gbs,
        lr_decay_style=cfg.schedule.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=schedule.train_iters * gbs, wd_incr_style="constant",
    )


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns the last logged metrics."""
    parallel.initialize(cfg)
    try:
        return _train(cfg)
    finally:
        parallel.destroy()


def _train(cfg: Config) -> dict:
    schedule = schedule_of(cfg, parallel_state.get_data_parallel_world_size())
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if padded_vocab_size(cfg) < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens: "
            "set model.vocab_size to the tokenizer's vocabulary"
        )
    gbs = cfg.training.global_batch_size
    evals = schedule.train_iters // cfg.training.eval_interval + 1
    train_set, valid_set, _ = build_gpt_datasets(
        cfg.data.prefix, tokenizer, cfg.model.seq_length,
        (schedule.train_iters * gbs, evals * cfg.training.eval_iters * gbs, 0),
        split=cfg.data.split, seed=cfg.training.seed, cache_dir=cfg.data.cache_dir,
    )
    model, optimizer = build_model_and_optimizer(cfg)
    adagc = AdaGC(cfg.adagc) if cfg.adagc.enabled else None
    if adagc is not None:
        attach_adagc(optimizer, [model], adagc)
    scheduler = build_scheduler(cfg, optimizer, schedule)

    save_dir = cfg.checkpoint.save or os.path.join(cfg.run_dir, "checkpoints")
    load_dir = cfg.checkpoint.load or save_dir
    iteration, consumed = 0, 0
    resume_from = latest_iteration(load_dir)
    if resume_from is not None:
        state = load_checkpoint(load_dir, resume_from)
        parallel_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if adagc is not None and state.get("adagc"):
            adagc.load_state_dict(state["adagc"])
        iteration, consumed = state["iteration"], state["consumed_samples"]

    logger = _RunLogger(cfg, schedule, start=iteration) if parallel.is_logging_rank() else None
    step = partial(forward_step, SimRegObjective.from_config(cfg), lambda it: on_this_rank(next(it)))
    run_schedule = get_forward_backward_func()
    train_batches = micro_batches(train_set, consumed, cfg.training.micro_batch_size, schedule.micro_batches)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    last = {}
    while iteration < schedule.train_iters:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = run_schedule(
            forward_step_func=step, data_iterator=train_batches, model=[model], num_microbatches=schedule.micro_batches,
            seq_length=cfg.model.seq_length, micro_batch_size=cfg.training.micro_batch_size, forward_only=False,
        )
        metrics = _last_stage_metrics(reports, dp_group)
        if metrics is not None and not math.isfinite(metrics["lm loss"] + metrics.get("simreg", 0.0)):
            previous = latest_iteration(save_dir)
            raise TrainingError(
                f"loss is not finite at iteration {iteration + 1} ({metrics}); stopped before the optimizer step. "
                + (f"The last good checkpoint is iteration {previous} in {save_dir}." if previous else "No checkpoint was saved yet.")
            )
        updated, grad_norm, _ = optimizer.step()
        scheduler.step(increment=gbs)
        iteration += 1
        consumed += gbs
        if logger is not None:
            extra = {"learning-rate": optimizer.param_groups[0]["lr"]}
            if grad_norm is not None:
                extra["grad-norm"] = float(grad_norm)
            if adagc is not None and getattr(optimizer, "adagc_stats", None) is not None:
                extra.update(optimizer.adagc_stats.as_dict())
            last = logger.train_step(iteration, consumed, {**metrics, **extra})
        if iteration % cfg.training.eval_interval == 0 or iteration == schedule.train_iters:
            valid = evaluate(cfg, model, step, valid_set, schedule, dp_group)
            if logger is not None and valid is not None:
                logger.validation(iteration, consumed, valid)
        stop = cfg.training.exit_interval is not None and iteration % cfg.training.exit_interval == 0
        if stop or iteration % cfg.training.save_interval == 0 or iteration == schedule.train_iters:
            save_checkpoint(save_dir, iteration, {
                "model": parallel_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "adagc": adagc.state_dict() if adagc else None,
                "consumed_samples": consumed,
            })
        if stop:
            break
    if logger is not None:
        logger.close()
    return last


def parallel_model(model):
    return model.module


def evaluate(cfg: Config, model, step, valid_set, schedule: Schedule, dp_group) -> dict | None:
    """Mean metrics over `eval_iters` global batches from the start of the validation split."""
    if valid_set is None:
        return None
    run_schedule = get_forward_backward_func()
    batches = micro_batches(valid_set, 0, cfg.training.micro_batch_size, schedule.micro_batches)
    reports = []
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.training.eval_iters):
            reports += run_schedule(
                forward_step_func=step, data_iterator=batches, model=[model], num_microbatches=schedule.micro_batches,
                seq_length=cfg.model.seq_length, micro_batch_size=cfg.training.micro_batch_size, forward_only=True,
            )
    model.train()
    return _last_stage_metrics(reports, dp_group)


def _last_stage_metrics(reports, dp_group) -> dict | None:
    if not parallel_state.is_pipeline_last_stage():
        return None
    return reduce_reports(reports, dp_group)


class _RunLogger:
    """Console, progress bar, TensorBoard and JSONL, on the one rank that reports."""

    def __init__(self, cfg: Config, schedule: Schedule, start: int):
        self.cfg, self.schedule = cfg, schedule
        save_config(cfg, cfg.run_dir)
        self.jsonl = MetricsWriter(cfg.run_dir) if cfg.logging.jsonl else None
        self.tensorboard = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))
        self.bar = tqdm(total=schedule.train_iters, initial=start, desc=cfg.name, unit="it")
        self.window_start = time.perf_counter()

    def train_step(self, iteration: int, consumed: int, metrics: dict) -> dict:
        tokens = consumed * self.cfg.model.seq_length
        self.bar.update(1)
        self.bar.set_postfix({"lm loss": f"{metrics['lm loss']:.3f}", "simreg": f"{metrics.get('simreg', 0):.2e}"})
        self._write("train", iteration, consumed, metrics)
        if iteration % self.cfg.training.log_interval == 0:
            elapsed = time.perf_counter() - self.window_start
            self.window_start = time.perf_counter()
            speed = self.cfg.training.log_interval * self.schedule.tokens_per_iter / elapsed
            text = " | ".join(f"{k}: {v:.4g}" for k, v in metrics.items())
            self.bar.write(f" iteration {iteration}/{self.schedule.train_iters} | tokens {tokens:,} | {speed:,.0f} tokens/s | {text}")
        return metrics

    def validation(self, iteration: int, consumed: int, metrics: dict) -> None:
        self._write("valid", iteration, consumed, metrics)
        text = " | ".join(f"{k}: {v:.4g}" for k, v in metrics.items())
        self.bar.write(f" validation at iteration {iteration} | {text} | lm loss PPL: {math.exp(min(20, metrics['lm loss'])):.2f}")

    def _write(self, split: str, iteration: int, consumed: int, metrics: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(split, iteration, consumed * self.cfg.model.seq_length, metrics)
        if self.tensorboard is not None:
            suffix = " validation" if split == "valid" else ""
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"{name}{suffix}", value, iteration)
                self.tensorboard.add_scalar(f"{name}{suffix} vs samples", value, consumed)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
