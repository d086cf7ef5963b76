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
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_simreg import parallel, regularizers
from megatron_simreg.adagc import AdaGC
from megatron_simreg.batches import micro_batches, on_this_rank
from megatron_simreg.checkpoint import (
    chosen_iteration,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from megatron_simreg.config import Config, save_config
from megatron_simreg.cpu_compat import cpu_compat
from megatron_simreg.data import build_run_datasets
from megatron_simreg.failures import (
    Interrupted,
    StopSignals,
    TrainingError,
    check_finite_weights,
    is_non_finite_gradient,
    last_good_checkpoint,
    non_finite_gradient_stop,
)
from megatron_simreg.megatron_adagc import attach_adagc
from megatron_simreg.metrics import TENSORBOARD_SUFFIXES, MetricsWriter
from megatron_simreg.model import model_provider
from megatron_simreg.objective import (
    SimRegObjective,
    forward_step,
    reduce_reports,
    regularizer_state_left_out,
    update_regularizer_state,
)
from megatron_simreg.progress import progress_bar
from megatron_simreg.resume import build_scheduler, model_shape
from megatron_simreg.run_folder import RunFolders
from megatron_simreg.run_plan import RunPlan, min_lr, plan_run


def build_model_and_optimizer(cfg: Config):
    pre, post = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = model_provider(cfg, pre_process=pre, post_process=post)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=True,  # as megatron.training's --check-for-nan-in-loss-and-grad (see failures.py)
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=min_lr(cfg),
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


def train(cfg: Config) -> dict:
    """Run (or resume) training on this machine's CPU; returns the last logged metrics."""
    plan = plan_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # every check before any process group starts
    with cpu_compat():
        parallel.initialize(cfg)
        try:
            with StopSignals() as signals, RunFolders(cfg.run_dir, plan.save_dir):  # checked and locked first
                return _train(cfg, plan, signals)
        finally:
            parallel.destroy()


def _train(cfg: Config, plan: RunPlan, signals: StopSignals) -> dict:
    resume_from = chosen_iteration(plan.load_dir, cfg.checkpoint.load_iteration)
    remove_partial_checkpoints(plan.save_dir)
    gbs = cfg.training.global_batch_size
    train_set, valid_set, test_set = build_run_datasets(cfg, plan)
    model, optimizer = build_model_and_optimizer(cfg)
    if cfg.adagc.enabled:
        attach_adagc(optimizer, [model], AdaGC(cfg.adagc))  # its state rides in the optimizer's checkpoint entry
    scheduler = build_scheduler(cfg, optimizer, plan)

    iteration, consumed = 0, 0
    if resume_from is not None:
        state = load_checkpoint(plan.load_dir, resume_from, weights_only=plan.finetune)
        if plan.finetune:  # weights only, as Megatron's --finetune: fresh optimizer state, schedule, baseline state
            weights = {k: v for k, v in state["model"].items() if not k.startswith(regularizers.STATE_KEYS)}
            with regularizer_state_left_out([model]):
                parallel_model(model).load_state_dict(weights)
            optimizer.reload_model_params()  # bf16: the optimizer's fp32 main copies of the weights
            if parallel.is_logging_rank():
                print(plan.finetune_start, flush=True)
        else:
            parallel_model(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            iteration, consumed = state["iteration"], state["consumed_samples"]

    logger = _RunLogger(cfg, plan, start=iteration) if parallel.is_logging_rank() else None
    step = partial(forward_step, SimRegObjective.from_config(cfg), lambda it: on_this_rank(next(it)))
    run_schedule = get_forward_backward_func()
    train_batches = micro_batches(train_set, consumed, cfg.training.micro_batch_size, plan.micro_batches)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    last = {}
    while iteration < plan.train_iters:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        try:
            reports = run_schedule(
                forward_step_func=step, data_iterator=train_batches, model=[model],
                num_microbatches=plan.micro_batches, seq_length=cfg.model.seq_length,
                micro_batch_size=cfg.training.micro_batch_size, forward_only=False,
            )
        except RuntimeError as error:
            if is_non_finite_gradient(error):
                raise non_finite_gradient_stop(iteration + 1, plan.save_dir) from None
            raise
        metrics = _last_stage_metrics(reports, dp_group)
        trained = ("lm loss", "simreg", cfg.regularizer.name)  # the terms of the loss (a baseline's by its name)
        if metrics is not None and not math.isfinite(sum(metrics.get(key, 0.0) for key in trained)):
            raise TrainingError(
                f"loss is not finite at iteration {iteration + 1} ({metrics}); stopped before the optimizer step. "
                + last_good_checkpoint(plan.save_dir)
            )
        updated, grad_norm, _ = optimizer.step()
        if updated:  # a skipped step (AdaGC on a non-finite norm) leaves the schedule where it is, as in Megatron
            update_regularizer_state([model])
            scheduler.step(increment=gbs)
        iteration += 1
        consumed += gbs
        if logger is not None:
            extra = {"learning-rate": optimizer.param_groups[0]["lr"]}
            if grad_norm is not None:
                extra["grad-norm"] = float(grad_norm)
            if getattr(optimizer, "adagc_stats", None) is not None:
                extra.update(optimizer.adagc_stats.as_dict())
            last = logger.train_step(iteration, consumed, {**metrics, **extra})
        if iteration % cfg.training.eval_interval == 0 or iteration == plan.train_iters:
            valid = evaluate(cfg, model, step, valid_set, plan, dp_group)
            if logger is not None and valid is not None:
                logger.evaluation("valid", iteration, consumed, valid)
        if iteration == plan.train_iters:  # as megatron.training: the test set once, after the last iteration
            test = evaluate(cfg, model, step, test_set, plan, dp_group)
            if logger is not None and test is not None:
                logger.evaluation("test", iteration, consumed, test)
        signalled = signals.agreed()
        stop = cfg.training.exit_interval is not None and iteration % cfg.training.exit_interval == 0 or bool(signalled)
        if stop or iteration % cfg.training.save_interval == 0 or iteration == plan.train_iters:
            check_finite_weights([model], iteration, plan.save_dir)
            save_checkpoint(plan.save_dir, iteration, {
                "model": parallel_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "consumed_samples": consumed,
                "global_batch_size": gbs, "model_shape": model_shape(cfg),  # what a resume checks (resume.py)
            })
        if signalled:
            if logger is not None:
                logger.close()
            raise Interrupted(signalled, iteration, plan.save_dir)
        if stop:
            break
    if logger is not None:
        logger.close()
    return last


def parallel_model(model):
    return model.module


def evaluate(cfg: Config, model, step, dataset, plan: RunPlan, dp_group) -> dict | None:
    """Mean metrics over `eval_iters` global batches from the start of `dataset` (validation or test)."""
    if dataset is None:
        return None
    run_schedule = get_forward_backward_func()
    batches = micro_batches(dataset, 0, cfg.training.micro_batch_size, plan.micro_batches)
    reports = []
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.training.eval_iters):
            reports += run_schedule(
                forward_step_func=step, data_iterator=batches, model=[model], num_microbatches=plan.micro_batches,
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

    def __init__(self, cfg: Config, plan: RunPlan, start: int):
        self.cfg, self.plan = cfg, plan
        save_config(cfg, cfg.run_dir)
        self.jsonl = MetricsWriter(cfg.run_dir, resumed_at=start) if cfg.logging.jsonl else None
        self.tensorboard = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))
        self.bar = progress_bar(total=plan.train_iters, initial=start, desc=cfg.name, unit="it")
        self.window_start = time.perf_counter()

    def train_step(self, iteration: int, consumed: int, metrics: dict) -> dict:
        tokens = consumed * self.cfg.model.seq_length
        self.bar.update(1)
        self.bar.set_postfix({"lm loss": f"{metrics['lm loss']:.3f}", "simreg": f"{metrics.get('simreg', 0):.2e}"})
        self._write("train", iteration, consumed, metrics)
        if iteration % self.cfg.training.log_interval == 0:
            elapsed = time.perf_counter() - self.window_start
            self.window_start = time.perf_counter()
            speed = self.cfg.training.log_interval * self.plan.tokens_per_iter / elapsed
            text = " | ".join(f"{k}: {v:.4g}" for k, v in metrics.items())
            self.bar.write(
                f" iteration {iteration}/{self.plan.train_iters} | tokens {tokens:,} | {speed:,.0f} tokens/s | {text}"
            )
        return metrics

    def evaluation(self, split: str, iteration: int, consumed: int, metrics: dict) -> None:
        self._write(split, iteration, consumed, metrics)
        text = " | ".join(f"{k}: {v:.4g}" for k, v in metrics.items())
        perplexity = math.exp(min(20, metrics["lm loss"]))
        name = "validation" if split == "valid" else split
        self.bar.write(f" {name} at iteration {iteration} | {text} | lm loss PPL: {perplexity:.2f}")

    def _write(self, split: str, iteration: int, consumed: int, metrics: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(split, iteration, consumed * self.cfg.model.seq_length, metrics)
        if self.tensorboard is not None:
            suffix = TENSORBOARD_SUFFIXES.get(split, "")
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"{name}{suffix}", value, iteration)
                self.tensorboard.add_scalar(f"{name}{suffix} vs samples", value, consumed)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
