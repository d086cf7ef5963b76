"""The GPU path: Megatron-LM's own loop (`megatron.training.pretrain`) with our pieces.

Every touch of megatron.training lives here (its `pretrain()` contract changes between releases; this
targets megatron-core 0.19.x). Our config becomes Megatron's command-line arguments, parsed by its own
parser; the model provider, forward step (SimReg through the output processor), loss function and
dataset provider are the ones the local loop uses, and the run plan (`run_plan.py`) they share derives the
sizes, tokenizer and checks; AdaGC is attached to the optimizer Megatron builds, and its state travels
inside that optimizer's part of Megatron's checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
from functools import partial

import torch

from megatron_simreg import checksums
from megatron_simreg.adagc import AdaGC
from megatron_simreg.batches import on_this_rank
from megatron_simreg.checkpoint import (
    RESUME,
    CheckpointError,
    chosen_iteration,
    iteration_dir,
    latest_iteration,
    verify_checkpoint,
)
from megatron_simreg.config import Config, save_config
from megatron_simreg.data import build_run_datasets
from megatron_simreg.failures import (
    TrainingError,
    UnwritablePath,
    check_finite_weights,
    interrupted_message,
    is_non_finite_gradient,
    non_finite_gradient_stop,
)
from megatron_simreg.megatron_adagc import AdaGCStateMissing
from megatron_simreg.model import have_transformer_engine, model_provider
from megatron_simreg.objective import (
    SimRegObjective,
    forward_step,
    regularizer_state_left_out,
    update_regularizer_state,
)
from megatron_simreg.parallel import join_process_group, launched
from megatron_simreg.resume import build_scheduler
from megatron_simreg.run_folder import FolderInUse, RunFolders
from megatron_simreg.run_plan import RunPlan, plan_run

# megatron-core's local layers: without TE, Megatron's RoPE and gradient-accumulation fusions are unavailable, and
# its fused masked softmax needs a CUDA extension the megatron-core wheel does not build
LOCAL_LAYER_ARGS = ["--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
                    "--no-masked-softmax-fusion"]


def have_apex_wgrad_fusion() -> bool:
    """Whether NVIDIA apex's fused weight-gradient extension (`fused_weight_gradient_mlp_cuda`) can be imported."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def megatron_arguments(cfg: Config, plan: RunPlan, *, transformer_engine: bool, wgrad_fusion: bool = True) -> list[str]:
    """The megatron.training command-line arguments for this config on a node with or without Transformer Engine.

    `wgrad_fusion`: whether NVIDIA apex's weight-gradient extension is there (NGC images ship it); without it the
    gradient-accumulation fusion is turned off, as megatron-core's output layer, a plain ColumnParallelLinear also
    under Transformer Engine, refuses to be built with it. `cfg.megatron.extra_args` come last, so a flag given
    there wins over the derived one.
    """
    m, o, s, t, p = cfg.model, cfg.optimizer, cfg.schedule, cfg.training, cfg.parallel
    args = [
        "--num-layers", m.num_layers, "--hidden-size", m.hidden_size, "--ffn-hidden-size", m.ffn_hidden_size,
        "--num-attention-heads", m.num_attention_heads, "--seq-length", m.seq_length,
        "--max-position-embeddings", m.seq_length, "--position-embedding-type", "rope", "--rotary-base", m.rotary_base,
        "--normalization", "RMSNorm", "--norm-epsilon", m.norm_epsilon, "--swiglu", "--disable-bias-linear",
        "--init-method-std", m.init_method_std, "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
        "--attention-softmax-in-fp32",
        "--tokenizer-type", plan.megatron_tokenizer_type, "--tokenizer-model", plan.tokenizer_path,
        "--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by,
        "--micro-batch-size", t.micro_batch_size, "--global-batch-size", t.global_batch_size,
        "--train-iters", plan.train_iters, "--lr", o.lr, "--min-lr", plan.min_lr,
        "--lr-decay-style", s.decay_style, "--lr-warmup-iters", s.warmup_steps, "--lr-decay-iters", plan.train_iters,
        "--weight-decay", o.weight_decay,
        "--adam-beta1", o.adam_beta1, "--adam-beta2", o.adam_beta2, "--adam-eps", o.adam_eps,
        "--clip-grad", 0.0 if cfg.adagc.enabled else o.clip_grad, "--seed", t.seed,
        "--tensor-model-parallel-size", p.tensor, "--pipeline-model-parallel-size", p.pipeline,
        "--context-parallel-size", p.context,
        "--log-interval", t.log_interval, "--eval-interval", t.eval_interval, "--eval-iters", t.eval_iters,
        "--save-interval", t.save_interval, "--save", plan.save_dir, "--load", plan.load_dir,
        *_data_arguments(cfg), "--log-throughput", "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
    ]
    if t.exit_interval:
        args += ["--exit-interval", t.exit_interval]
    if plan.finetune:  # checkpoint.finetune: the weights of --load only; iteration 0, no optimizer, RNG or schedule
        args += ["--finetune"]
    if m.num_query_groups and m.num_query_groups != m.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", m.num_query_groups]
    if m.untie_embeddings_and_output_weights:
        args += ["--untie-embeddings-and-output-weights"]
    if t.precision == "bf16":
        args += ["--bf16"]
    if p.sequence_parallel and p.tensor > 1:
        args += ["--sequence-parallel"]
    if p.distributed_optimizer:
        args += ["--use-distributed-optimizer"]
    if m.num_experts:
        args += [
            "--num-experts", m.num_experts, "--moe-router-topk", m.moe_router_topk,
            "--moe-ffn-hidden-size", m.moe_ffn_hidden_size or m.ffn_hidden_size,
            "--moe-aux-loss-coeff", m.moe_aux_loss_coeff, "--moe-router-load-balancing-type", "aux_loss",
            "--moe-token-dispatcher-type", p.moe_token_dispatcher, "--expert-model-parallel-size", p.expert,
        ]
    if cfg.logging.tensorboard:
        args += ["--tensorboard-dir", os.path.join(cfg.run_dir, "tensorboard")]
    if cfg.logging.wandb_project:
        args += ["--wandb-project", cfg.logging.wandb_project, "--wandb-exp-name", cfg.name]
    if cfg.data.cache_dir:
        args += ["--data-cache-path", cfg.data.cache_dir]
    if transformer_engine:
        args += ["--transformer-impl", "transformer_engine"]
        if not wgrad_fusion:
            args += ["--no-gradient-accumulation-fusion"]
    else:
        args += LOCAL_LAYER_ARGS
    args += _failure_handling_arguments(cfg)
    return [str(a) for a in args + cfg.megatron.extra_args]


def _data_arguments(cfg: Config) -> list[str]:
    """Megatron's `--data-path` and `--split`, or a path per split for held-out evaluation sets (the datasets
    themselves come from our provider; Megatron reads these to know which evaluations to run)."""
    d = cfg.data
    if d.valid_prefix is None and d.test_prefix is None:
        return ["--split", d.split, "--data-path", *d.prefix]
    args = ["--train-data-path", *d.prefix]
    for flag, prefix in (("--valid-data-path", d.valid_prefix), ("--test-data-path", d.test_prefix)):
        args += [flag, prefix] if prefix is not None else []
    return args


def _failure_handling_arguments(cfg: Config) -> list[str]:
    """How the run stops without losing work, as the local loop does (failures.py).

    `--check-for-nan-in-loss-and-grad` is Megatron's default; with `--rerun-mode disabled` a non-finite
    gradient stops the run before the optimizer step. (Megatron's default, `validate_results`, reruns the
    step and saves a checkpoint that resumes only on another GPU: on one node the run could never go on,
    not even with a lower learning rate.) A resumed run takes the config's optimizer settings
    (`--override-opt_param-scheduler`; resume.py lets the optimizer's parameter groups follow). SIGTERM
    finishes the step and saves (`--exit-signal-handler`; SIGINT is forwarded to it by `_sigint_as_sigterm`).
    `checkpoint.load_iteration` resumes from an earlier iteration (`--ckpt-step`).
    """
    args = ["--rerun-mode", "disabled", "--override-opt_param-scheduler", "--exit-signal-handler"]
    if cfg.checkpoint.load_iteration is not None:
        args += ["--ckpt-step", cfg.checkpoint.load_iteration]
    return args


def pretrain(cfg: Config) -> None:
    """Run megatron.training's loop for `cfg` (started by torchrun on GPUs)."""
    try:
        # reads the checkpoint's tracker (a garbage one: Megatron would print it and exit with 0) and record
        plan = plan_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        run_folders = RunFolders(cfg.run_dir, plan.save_dir)  # checked and locked (rank 0) before Megatron starts
    except (UnwritablePath, CheckpointError, FileNotFoundError, FolderInUse) as error:
        sys.exit(f"training stopped: {error}")
    with run_folders:
        _pretrain(cfg, plan)


def _pretrain(cfg: Config, plan: RunPlan) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    sys.argv = [sys.argv[0]] + megatron_arguments(cfg, plan, transformer_engine=have_transformer_engine(),
                                                  wgrad_fusion=have_apex_wgrad_fusion())
    args = parse_and_validate_args()
    if not launched():  # megatron.training would rendezvous at env:// (MASTER_PORT); it joins this group instead
        join_process_group(args.distributed_backend)
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, cfg.run_dir)
        if plan.finetune:
            print(plan.finetune_start, flush=True)

    evaluated = {}  # the valid and test sets, each evaluation's fixed sample

    def datasets_provider(num_samples, vp_stage=None):  # megatron passes vp_stage with virtual pipelines
        # the run's own sizes, not Megatron's num_samples (its train_iters x today's batch, and another validation
        # sample for each evaluation)
        datasets = build_run_datasets(cfg, plan)
        evaluated.update(valid=datasets[1], test=datasets[2])
        return datasets

    datasets_provider.is_distributed = True  # every rank reads its own batches (no broadcast)
    step = partial(forward_step, SimRegObjective.from_config(cfg), _cuda_batch)
    adagc = AdaGC(cfg.adagc) if cfg.adagc.enabled else None
    with contextlib.ExitStack() as during_the_run:  # megatron.training's hooks, restored when it returns
        during_the_run.enter_context(_shipped_dataset_helpers())
        during_the_run.enter_context(_replaced(training, "get_megatron_optimizer", partial(_with_our_step, adagc)))
        during_the_run.enter_context(_replaced(training, "save_checkpoint", partial(_saving_only_finite_weights, args)))
        during_the_run.enter_context(_replaced(training, "load_checkpoint", partial(_verifying_checksums, args)))
        during_the_run.enter_context(_replaced(training, "get_optimizer_param_scheduler",  # ours, in samples
                                               lambda _: partial(build_scheduler, cfg, plan=plan)))
        during_the_run.enter_context(_replaced(training, "evaluate_and_print_results",
                                               partial(_scoring_fixed_samples, evaluated)))
        during_the_run.enter_context(_stop_in_one_line(args))
        training.pretrain(
            pretrain_cfg_container_from_args(args),
            datasets_provider,
            ModelType.encoder_or_decoder,
            lambda data_iterator, model, *rest, **kw: step(data_iterator, model),
            model_provider=partial(_model_provider, cfg),
        )


def _model_provider(cfg: Config, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Our model from the TransformerConfig Megatron derives from its arguments (fusions and extra flags included)."""
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    config = config or core_transformer_config_from_args(get_args())
    return model_provider(cfg, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)


@contextlib.contextmanager
def _stop_in_one_line(args):
    """A stop the user must act on (non-finite gradients or weights) ends in one line naming the checkpoint to
    resume from, not a traceback; a stop by SIGTERM/SIGINT says what was saved and exits with 128 + the signal
    (megatron.training exits with 0 after its signal handler's save: a requeueing scheduler would take it as done)."""
    from megatron.training.global_vars import get_args

    received = []
    previous = signal.signal(signal.SIGINT, partial(_sigint_as_sigterm, received))
    try:
        yield
    except (TrainingError, AdaGCStateMissing, CheckpointError) as error:
        sys.exit(f"training stopped: {error}")
    except RuntimeError as error:
        if not is_non_finite_gradient(error):
            raise
        sys.exit(f"training stopped: {non_finite_gradient_stop(get_args().curr_iteration + 1, args.save)}")
    except _InterruptedEarly as stop:
        print(f"training stopped: received {signal.Signals(stop.code - 128).name} before training started; "
              "nothing was saved", file=sys.stderr, flush=True)
        sys.exit(stop.code)
    except SystemExit as stop:
        signum = received[0] if received else signal.SIGTERM if _megatron_received_a_signal() else None
        if signum is None or stop.code not in (0, None):
            raise
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"training stopped: {interrupted_message(signum, latest_iteration(args.save), args.save)}",
                  file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_as_sigterm(received: list, signum, frame) -> None:
    """Ctrl-C does what SIGTERM does: megatron.training's handler takes one signal (SIGTERM)."""
    from megatron.training.global_vars import get_signal_handler

    received.append(signum)
    try:
        get_signal_handler()
    except AssertionError:  # before Megatron's handler is installed: nothing to save yet
        raise _InterruptedEarly(128 + signum) from None
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, frame)


class _InterruptedEarly(SystemExit):
    """Ctrl-C before megatron.training's loop began."""


def _megatron_received_a_signal() -> bool:
    from megatron.training.global_vars import get_signal_handler

    try:
        return bool(get_signal_handler()._signal_received)  # its flag: asking all ranks would need a collective
    except (AssertionError, AttributeError):  # no handler installed
        return False


@contextlib.contextmanager
def _replaced(owner, name: str, wrap):
    """`owner.name` replaced by `wrap(original)` while inside, restored on leaving."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _scoring_fixed_samples(evaluated: dict, evaluate_and_print):
    """Every evaluation scores the first eval_iters global batches of its set, as the local loop does (Megatron's
    loop walks on through the validation set, so each evaluation would score other sequences), and the test
    evaluation at the end of training is logged under its own TensorBoard names (`lm loss test`), where
    megatron.training logs it as `lm loss validation` at the last validation's step. Each set's loader is built
    once: a new iterator over it starts again at its first sample (Megatron's loaders keep their workers, which
    then drop what they had read ahead)."""
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.training import training
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader

    loaders = {}

    def evaluate_fixed(prefix, forward_step_func, data_iterator, *args, **kwargs):
        split = "test" if prefix.endswith("on test set") else "valid"
        if split not in loaders:
            loaders[split] = build_pretraining_data_loader(evaluated[split], 0)
        from_the_start = RerunDataIterator(iter(loaders[split]))
        if split == "valid":
            return evaluate_and_print(prefix, forward_step_func, from_the_start, *args, **kwargs)
        get_writer = training.get_tensorboard_writer
        renamed = (lambda: None) if get_writer() is None else (lambda: _RenamedScalars(get_writer()))
        with _replaced(training, "get_tensorboard_writer", lambda _: renamed):
            return evaluate_and_print(prefix, forward_step_func, from_the_start, *args, **kwargs)

    return evaluate_fixed


class _RenamedScalars:
    """A TensorBoard writer whose `... validation ...` scalars are written as `... test ...`."""

    def __init__(self, writer):
        self.writer = writer

    def add_scalar(self, tag, *args, **kwargs):
        return self.writer.add_scalar(tag.replace(" validation", " test"), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.writer, name)


def _saving_only_finite_weights(args, save):
    """Refuse a checkpoint of non-finite weights, and record the checksums of the files saved (as the local
    loop does; an asynchronous or non-persistent save finishes later or elsewhere, unrecorded)."""

    def save_if_finite(iteration, model, *a, **kw):
        check_finite_weights(model, iteration, args.save)
        if args.async_save or kw.get("non_persistent_ckpt"):
            return save(iteration, model, *a, **kw)
        with checksums.recording(iteration_dir(args.save, iteration)):
            return save(iteration, model, *a, **kw)

    return save_if_finite


def _verifying_checksums(args, load):
    """Check the files of the checkpoint Megatron is about to load against their checksums (as the local loop
    does), on every rank before any reads a weight; under --finetune read no baseline state (as the local loop)."""

    def verify_then_load(model_chunks, *a, **kw):
        iteration = chosen_iteration(args.load, args.ckpt_step)  # checked by pretrain() before Megatron started
        if iteration is not None:
            verify_checkpoint(args.load, iteration, RESUME, collective=True)
        with regularizer_state_left_out(model_chunks) if args.finetune else contextlib.nullcontext():
            return load(model_chunks, *a, **kw)

    return verify_then_load


def _with_our_step(adagc: AdaGC | None, build):
    """The optimizer megatron.training builds, with AdaGC clipping (and checkpointing with) it, and the trained
    regularizer's state (SCE's EMA target) updated after each successful step, as in the local loop.
    megatron.training offers no hook between building the optimizer and loading the checkpoint into it, hence
    its factory is wrapped."""
    from megatron_simreg.megatron_adagc import attach_adagc

    def build_ours(config, model_chunks, *args, **kwargs):
        optimizer = build(config, model_chunks, *args, **kwargs)
        if adagc is not None:
            attach_adagc(optimizer, model_chunks, adagc)
            _log_adagc_each_step(optimizer)
        step = optimizer.step

        def step_then_update_state():
            result = step()
            if result[0]:
                update_regularizer_state(model_chunks)
            return result

        optimizer.step = step_then_update_state
        return optimizer

    return build_ours


@contextlib.contextmanager
def _shipped_dataset_helpers():
    """While megatron.training runs: skip its `make` of the dataset helpers when they are already compiled.

    `initialize_megatron` runs `make -C megatron/core/datasets` on rank 0; the PyPI wheel ships the built
    `helpers_cpp` extension but no Makefile, so that `make` fails and Megatron exits before training.
    A Megatron-LM source tree (Makefile, no extension yet) still compiles them as usual.
    """
    from megatron.core.datasets import utils as dataset_utils

    from megatron_simreg.data.datasets import check_dataset_helpers

    try:
        check_dataset_helpers()
    except ImportError:
        if os.path.isfile(os.path.join(os.path.dirname(dataset_utils.__file__), "Makefile")):
            yield
            return
        raise
    compile_helpers = dataset_utils.compile_helpers
    dataset_utils.compile_helpers = lambda: None
    try:
        yield
    finally:
        dataset_utils.compile_helpers = compile_helpers


def _cuda_batch(data_iterator) -> dict:
    batch = next(data_iterator)
    return on_this_rank({k: v.cuda(non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)})


def _log_adagc_each_step(optimizer) -> None:
    """AdaGC's figures beside Megatron's own log lines and in its TensorBoard/W&B, every log interval.

    Megatron logs the returned norm (before clipping) as "grad norm"; the rest comes from here.
    """
    from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer
    from megatron.training.utils import print_rank_last

    clipped_step = optimizer.step

    def step_and_log():
        result = clipped_step()
        stats = getattr(optimizer, "adagc_stats", None)
        args = get_args()  # megatron.training's live arguments: curr_iteration moves each step
        iteration = args.curr_iteration + 1
        if stats is None or iteration % args.log_interval:
            return result
        figures = {key: value for key, value in stats.as_dict().items() if key != "grad-norm"}
        print_rank_last(" adagc at iteration {:8d} | ".format(iteration)
                        + " | ".join(f"{key}: {value:.6g}" for key, value in figures.items()))
        for writer in (get_tensorboard_writer(), get_wandb_writer()):
            if writer is None:
                continue
            for key, value in figures.items():
                if hasattr(writer, "add_scalar"):
                    writer.add_scalar(key, value, iteration)
                else:
                    writer.log({key: value}, iteration)
        return result

    optimizer.step = step_and_log
