"""The GPU path: Megatron-LM's own loop (`megatron.training.pretrain`) with our pieces.

Every touch of megatron.training lives here (its `pretrain()` contract changes between releases; this
targets megatron-core 0.19.x). Our config becomes Megatron's command-line arguments, parsed by its own
parser; the model provider, forward step (SimReg through the output processor), loss function and
dataset provider are the ones the local loop uses; AdaGC is attached to the optimizer Megatron builds
and its state is saved beside each Megatron checkpoint.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch

from megatron_simreg.adagc import AdaGC
from megatron_simreg.batches import on_this_rank
from megatron_simreg.config import Config, save_config
from megatron_simreg.data import build_gpt_datasets, build_tokenizer, default_tokenizer_path
from megatron_simreg.model import model_provider
from megatron_simreg.objective import SimRegObjective, forward_step


def megatron_arguments(cfg: Config, run_dir: str | None = None) -> list[str]:
    """The exact megatron.training command-line arguments for this config."""
    m, o, s, t, p = cfg.model, cfg.optimizer, cfg.schedule, cfg.training, cfg.parallel
    run_dir = run_dir or cfg.run_dir
    train_iters = cfg.train_iters
    args = [
        "--num-layers", m.num_layers, "--hidden-size", m.hidden_size, "--ffn-hidden-size", m.ffn_hidden_size,
        "--num-attention-heads", m.num_attention_heads, "--seq-length", m.seq_length,
        "--max-position-embeddings", m.seq_length, "--position-embedding-type", "rope", "--rotary-base", m.rotary_base,
        "--normalization", "RMSNorm", "--norm-epsilon", m.norm_epsilon, "--swiglu", "--disable-bias-linear",
        "--init-method-std", m.init_method_std, "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", cfg.data.tokenizer or default_tokenizer_path(),
        "--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by,
        "--micro-batch-size", t.micro_batch_size, "--global-batch-size", t.global_batch_size,
        "--train-iters", train_iters, "--lr", o.lr, "--min-lr", o.min_lr if o.min_lr is not None else o.lr / 10,
        "--lr-decay-style", s.decay_style, "--lr-warmup-iters", s.warmup_steps, "--lr-decay-iters", train_iters,
        "--weight-decay", o.weight_decay, "--adam-beta1", o.adam_beta1, "--adam-beta2", o.adam_beta2, "--adam-eps", o.adam_eps,
        "--clip-grad", 0.0 if cfg.adagc.enabled else o.clip_grad, "--seed", t.seed,
        "--tensor-model-parallel-size", p.tensor, "--pipeline-model-parallel-size", p.pipeline,
        "--context-parallel-size", p.context,
        "--log-interval", t.log_interval, "--eval-interval", t.eval_interval, "--eval-iters", t.eval_iters,
        "--save-interval", t.save_interval, "--save", cfg.checkpoint.save or os.path.join(run_dir, "checkpoints"),
        "--load", cfg.checkpoint.load or cfg.checkpoint.save or os.path.join(run_dir, "checkpoints"),
        "--split", cfg.data.split, "--data-path", *cfg.data.prefix,
        "--log-throughput", "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
    ]
    if t.exit_interval:
        args += ["--exit-interval", t.exit_interval]
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
        args += ["--tensorboard-dir", os.path.join(run_dir, "tensorboard")]
    if cfg.logging.wandb_project:
        args += ["--wandb-project", cfg.logging.wandb_project, "--wandb-exp-name", cfg.name]
    if cfg.data.cache_dir:
        args += ["--data-cache-path", cfg.data.cache_dir]
    if _have_transformer_engine():
        args += ["--transformer-impl", "transformer_engine"]
    else:  # without TE, Megatron's RoPE and gradient-accumulation fusions are unavailable
        args += ["--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion"]
    return [str(a) for a in args]


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def pretrain(cfg: Config) -> None:
    """Run megatron.training's loop for `cfg` (started by torchrun on GPUs)."""
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    sys.argv = [sys.argv[0]] + megatron_arguments(cfg)
    _use_shipped_dataset_helpers()
    args = parse_and_validate_args()
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, cfg.run_dir)
    if cfg.adagc.enabled:
        _attach_adagc_to_megatron(training, AdaGC(cfg.adagc), args)

    def datasets_provider(num_samples, vp_stage=None):  # megatron passes vp_stage with virtual pipelines
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        return build_gpt_datasets(cfg.data.prefix, tokenizer, cfg.model.seq_length, tuple(num_samples),
                                  split=cfg.data.split, seed=cfg.training.seed, cache_dir=cfg.data.cache_dir)

    datasets_provider.is_distributed = True  # every rank reads its own batches (no broadcast)
    step = partial(forward_step, SimRegObjective.from_config(cfg), _cuda_batch)
    training.pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        lambda data_iterator, model, *rest, **kw: step(data_iterator, model),
        model_provider=partial(model_provider, cfg),
    )


def _use_shipped_dataset_helpers() -> None:
    """Skip megatron.training's `make` of the dataset helpers when they are already compiled.

    `initialize_megatron` runs `make -C megatron/core/datasets` on rank 0; the PyPI wheel ships the built
    `helpers_cpp` extension but no Makefile, so that `make` fails and Megatron exits before training.
    A Megatron-LM source tree (Makefile, no extension yet) still compiles them as usual.
    """
    from megatron.core.datasets import utils as dataset_utils

    from megatron_simreg.data.datasets import check_dataset_helpers

    folder = os.path.dirname(dataset_utils.__file__)
    try:
        check_dataset_helpers()
    except ImportError:
        if os.path.isfile(os.path.join(folder, "Makefile")):
            return
        raise
    dataset_utils.compile_helpers = lambda: None


def _cuda_batch(data_iterator) -> dict:
    batch = next(data_iterator)
    return on_this_rank({k: v.cuda(non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)})


def _attach_adagc_to_megatron(training, adagc: AdaGC, args) -> None:
    """Wrap megatron.training's model/optimizer setup and checkpoint saving so AdaGC clips and persists."""
    from megatron.training import checkpointing

    from megatron_simreg.megatron_adagc import attach_adagc

    setup = training.setup_model_and_optimizer
    save = checkpointing.save_checkpoint

    def setup_with_adagc(*a, **kw):
        model, optimizer, scheduler = setup(*a, **kw)
        attach_adagc(optimizer, model, adagc)
        _log_adagc_each_step(optimizer)
        tracker = checkpointing.get_checkpoint_tracker_filename(args.load) if args.load else None
        if tracker and os.path.isfile(tracker):
            iteration, _ = checkpointing.read_metadata(tracker)
            state = _adagc_file(args.load, iteration)
            if os.path.isfile(state):
                adagc.load_state_dict(torch.load(state, weights_only=False))
        return model, optimizer, scheduler

    def save_with_adagc(iteration, *a, **kw):
        result = save(iteration, *a, **kw)
        path = _adagc_file(args.save, iteration)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(adagc.state_dict(), path)
        return result

    training.setup_model_and_optimizer = setup_with_adagc
    training.save_checkpoint = save_with_adagc


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


def _adagc_file(folder: str | None, iteration: int | None) -> str | None:
    if not folder or iteration is None:
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return os.path.join(folder, "adagc", f"iter_{iteration:07d}", f"rank_{rank:05d}.pt")
