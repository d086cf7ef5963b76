"""Resuming with settings other than the checkpoint's: another global batch size, other optimizer settings
(lr, min_lr, warm-up, length, decay style, weight decay), or, refused, another model size, precision or regularizer,
or a missing AdaGC state.

Before anything is built, `saved_progress` reads what the checkpoint was trained with (iteration, consumed
samples, global batch size, the model settings that shape its weights, its precision, its regularizer's and
AdaGC's state), from a local-loop file or from the arguments, common state and tensor names megatron.training
records in its torch_dist checkpoint, so both loops and the dry run plan alike (run_plan.py): the schedule lives
in samples, as Megatron's scheduler counts it, and a batch-size change moves neither the warm-up, nor the decay,
nor the run's end (a line says so); a model of another size is refused in one line (`check_same_model`) instead of
a size-mismatch traceback, and so are resuming in another precision (`check_same_precision`), with another
regularizer's state (`check_same_regularizer`) and AdaGC from a checkpoint without its state
(`check_adagc_state`), before the model is built.

After a stop the natural recovery is often a lower learning rate. megatron-core refuses that twice: the
optimizer matches the checkpoint's parameter groups by their settings (max_lr, min_lr, ... are part of the
key, so a new lr finds no group), and the scheduler asserts the checkpoint's values unless told to
override them (Megatron-LM's `--override-opt_param-scheduler`, which both loops set). `build_scheduler` lets the
config win in both places, as a user who changed it expects, and says in one line what changed.
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_simreg import regularizers
from megatron_simreg.checkpoint import FILE, CheckpointError, iteration_dir
from megatron_simreg.config import Config
from megatron_simreg.megatron_adagc import ADAGC_KEY, NO_ADAGC_STATE
from megatron_simreg.run_plan import RunPlan, padded_vocab_size

SCHEDULED = ("max_lr", "min_lr", "start_wd", "end_wd")  # per-group values the scheduler owns; the config's win
STRUCTURAL = tuple(key for key in param_group_identifier_keys if key not in SCHEDULED)
PADDED_VOCAB = "model.vocab_size (padded)"


@dataclass(frozen=True)
class SavedProgress:
    """How far a checkpoint's run got, and with what."""

    folder: str  # the iteration's folder
    iteration: int
    consumed_samples: int
    global_batch_size: int  # the batch the run was trained with: the unit of the config's iteration counts
    model: dict | None  # model_shape() of the run that saved it (megatron.training: from its arguments)
    adagc_state: bool | None  # whether its optimizer state holds AdaGC's (None: saved without optimizer state)
    regularizer_state: frozenset[str]  # the top-level names of its regularizer's state (regularizers.STATE_KEYS)
    precision: str | None  # training.precision it was trained in (None: not known)


def model_shape(cfg: Config) -> dict:
    """The model settings that shape the weights (RoPE's sequence length, norms' epsilon... do not), by config name."""
    m = cfg.model
    return {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.ffn_hidden_size": m.ffn_hidden_size, "model.num_attention_heads": m.num_attention_heads,
        "model.num_query_groups": m.num_query_groups or m.num_attention_heads,
        "model.untie_embeddings_and_output_weights": m.untie_embeddings_and_output_weights,
        "model.num_experts": m.num_experts,
        "model.moe_ffn_hidden_size": (m.moe_ffn_hidden_size or m.ffn_hidden_size) if m.num_experts else None,
        PADDED_VOCAB: padded_vocab_size(cfg),
    }


def saved_progress(load_dir: str, iteration: int | None) -> SavedProgress | None:
    """What the checkpoint at `iteration` was trained with, read without loading its weights; None without one
    (or with one that does not open: loading it then says what is wrong)."""
    if iteration is None:
        return None
    folder = iteration_dir(load_dir, iteration)
    if os.path.isfile(os.path.join(folder, "metadata.json")):
        return _megatron_progress(folder)
    files = sorted(glob.glob(os.path.join(folder, "mp_rank_*", FILE)))
    if not files:
        return None
    try:
        state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)  # the weights stay on disk
    except Exception:  # a truncated or overwritten file fails in zipfile, pickle or torch alike
        return None
    # checkpoints from before the batch size and model were recorded: the batch from the samples per iteration
    batch = state.get("global_batch_size") or state["consumed_samples"] // max(state["iteration"], 1)
    last_stage = state if len(files) == 1 else torch.load(files[-1], map_location="cpu", mmap=True, weights_only=False)
    return SavedProgress(folder, state["iteration"], state["consumed_samples"], batch, state.get("model_shape"),
                         _holds_adagc_state(state.get("optimizer")), _regularizer_state(last_stage["model"]),
                         _precision_of(state["model"]))


def _megatron_progress(folder: str) -> SavedProgress | None:
    """From megatron.training's torch_dist checkpoint: the arguments it saves in the common state, and the
    embedding's rows from the tensors' metadata (Megatron's own `padded_vocab_size` follows the tokenizer)."""
    from megatron.core import dist_checkpointing

    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            common = dist_checkpointing.load_common_state_dict(folder)
            tensors = dist_checkpointing.load_tensors_metadata(folder)
        args = common["args"]
    except Exception:  # an unreadable checkpoint (or one saved without arguments): megatron.training's load says
        return None
    model = {
        "model.num_layers": args.num_layers, "model.hidden_size": args.hidden_size,
        "model.ffn_hidden_size": args.ffn_hidden_size, "model.num_attention_heads": args.num_attention_heads,
        "model.num_query_groups": args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        "model.untie_embeddings_and_output_weights": args.untie_embeddings_and_output_weights,
        "model.num_experts": args.num_experts,
        "model.moe_ffn_hidden_size": args.moe_ffn_hidden_size if args.num_experts else None,
    }
    embedding = tensors.get("embedding.word_embeddings.weight")
    if embedding is not None:
        model[PADDED_VOCAB] = embedding.global_shape[0]
    return SavedProgress(folder, common["iteration"], args.consumed_train_samples, args.global_batch_size, model,
                         _holds_adagc_state(common.get("optimizer")), _regularizer_state(tensors),
                         "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")


def _precision_of(model_state: dict) -> str | None:
    """The local loop saves the model's weights in the dtype it trains in (a baseline's state is fp32 whatever)."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return next((names.get(tensor.dtype) for key, tensor in model_state.items() if not
                 key.startswith(regularizers.STATE_KEYS) and isinstance(tensor, torch.Tensor) and
                 tensor.is_floating_point()), None)


def _regularizer_state(keys) -> frozenset[str]:
    """`encoder` (SCE), `log_scale` (CPretrain): the first part of each key after regularizers.STATE_KEYS, in a
    local-loop file's model state or a torch_dist checkpoint's tensors alike."""
    prefix = regularizers.STATE_KEYS
    return frozenset(key.removeprefix(prefix).split(".")[0] for key in keys if key.startswith(prefix))


def _holds_adagc_state(optimizer_state) -> bool | None:
    """AdaGC's entry beside the optimizer's own (megatron_adagc), in a local-loop file or a torch_dist checkpoint's
    common state alike."""
    return ADAGC_KEY in optimizer_state if isinstance(optimizer_state, dict) else None


def check_same_model(cfg: Config, progress: SavedProgress | None) -> None:
    """Refuse, before anything is written, to resume a checkpoint into a model of another size."""
    if progress is None or progress.model is None:
        return
    now = model_shape(cfg)
    changed = [key for key, value in progress.model.items() if key in now and value != now[key]]
    if not changed:
        return
    new_run = "another logging.run_dir" + (", without checkpoint.load" if cfg.checkpoint.load else "")
    raise CheckpointError(
        f"checkpoint {os.path.dirname(progress.folder)} (iteration {progress.iteration}) was saved with "
        + ", ".join(f"{key}={progress.model[key]}" for key in changed) + "; this config has "
        + ", ".join(str(now[key]) for key in changed)
        + f": resume with the checkpoint's model settings, or start a new run ({new_run})"
    )


def check_same_regularizer(cfg: Config, progress: SavedProgress | None) -> None:
    """Refuse, before anything is built, to resume a checkpoint whose regularizer state is not the one this
    config's regularizer keeps (another baseline's, or none): loading would fail on the missing entries or drop
    the saved ones. A weights-only start (checkpoint.finetune) reads no regularizer state and is the way across."""
    if progress is None or _left_to_megatron(cfg, "--finetune"):
        return
    r = cfg.regularizer
    ours = regularizers.get(r.name).state_names(r.settings) if r.settings is not None else frozenset()
    if ours == progress.regularizer_state:
        return
    folder = os.path.dirname(progress.folder)
    raise CheckpointError(
        f"checkpoint {folder} (iteration {progress.iteration}) holds {_state_phrase(progress.regularizer_state)}; "
        f"regularizer.name={r.name} here keeps {_state_phrase(ours)}: resume with the regularizer it was trained "
        f"with, or start from its weights in another logging.run_dir (checkpoint.load={folder}, "
        "checkpoint.finetune=true)"
    )


def check_same_precision(cfg: Config, progress: SavedProgress | None) -> None:
    """Refuse, before anything is built, to resume in another training.precision: the optimizer's state differs
    (fp32 master weights beside bf16 ones, or none), and both loops' loads would stop on the missing entries."""
    if progress is None or progress.precision in (None, cfg.training.precision):
        return
    if _left_to_megatron(cfg, "--no-load-optim", "--finetune"):  # weights only: they load in any precision
        return
    raise CheckpointError(
        f"checkpoint {os.path.dirname(progress.folder)} (iteration {progress.iteration}) was trained with "
        f"training.precision={progress.precision}; this config has {cfg.training.precision}: resume with "
        f"training.precision={progress.precision}, or start from its weights in another logging.run_dir "
        f"(checkpoint.load={os.path.dirname(progress.folder)}, checkpoint.finetune=true)"
    )


def _left_to_megatron(cfg: Config, *flags: str) -> bool:
    """Megatron flags (megatron.extra_args) under which megatron.training loads less than the checkpoint holds:
    the checks in this file leave such resumes to that load."""
    return bool(set(flags) & set(cfg.megatron.extra_args))


def _state_phrase(names: frozenset[str]) -> str:
    return f"regularizer state {', '.join(sorted(names))}" if names else "no regularizer state"


def check_adagc_state(cfg: Config, progress: SavedProgress | None) -> None:
    """Refuse, before anything is built, to resume AdaGC from a checkpoint without its state: the optimizer's load
    refuses it too (megatron_adagc), but only once the model is built."""
    if progress is None or progress.adagc_state is not False or not (cfg.adagc.enabled and cfg.adagc.load_state):
        return
    if _left_to_megatron(cfg, "--no-load-optim", "--finetune"):
        return
    raise CheckpointError(f"checkpoint {os.path.dirname(progress.folder)} (iteration {progress.iteration}) "
                          f"{NO_ADAGC_STATE}")


def build_scheduler(cfg: Config, optimizer, plan: RunPlan) -> OptimizerParamScheduler:
    """Linear warm-up then cosine to min_lr, counted in samples as Megatron does, the same in both loops.

    The sample counts come from the plan (converted from iterations with the batch the run started with), so a
    resume with another global batch size keeps them. megatron.training's own scheduler, which this one replaces,
    would multiply --lr-warmup-iters and --lr-decay-iters by the current batch instead (its other --lr-* and
    weight-decay-increment arguments do not apply either). Resuming, the config's settings win.
    """
    o = cfg.optimizer
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=plan.min_lr,
        lr_warmup_steps=plan.warmup_samples, lr_decay_steps=plan.decay_samples,
        lr_decay_style=cfg.schedule.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=plan.decay_samples, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
    _accept_changed_settings(optimizer, scheduler, plan)
    return scheduler


def _accept_changed_settings(optimizer, scheduler, plan: RunPlan) -> None:
    """Make `optimizer.load_state_dict` and `scheduler.load_state_dict` accept a checkpoint saved with other
    settings (the scheduler must be built with override_opt_param_scheduler=True); loading, say what changed."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        _adopt_current_group_settings(part)
    load = scheduler.load_state_dict

    def load_and_report(state: dict) -> None:
        resumed = plan.resumed
        changes = _changes(state, scheduler, resumed.global_batch_size) if resumed is not None else []
        load(state)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        if plan.batch_size_change:
            print(plan.batch_size_change, flush=True)
        if changes:
            print(f"resuming from iteration {resumed.iteration} with changed optimizer settings: " + ", ".join(changes),
                  flush=True)

    scheduler.load_state_dict = load_and_report


def _adopt_current_group_settings(part) -> None:
    load = part.load_state_dict
    inner = getattr(part, "optimizer", None)

    def load_with_current_settings(state_dict):
        if inner is not None:
            for saved in _saved_param_groups(state_dict):
                current = [g for g in inner.param_groups if _structure(g) == _structure(saved)]
                if len({tuple(g.get(key) for key in SCHEDULED) for g in current}) == 1:  # one unambiguous match
                    saved.update({key: current[0][key] for key in SCHEDULED if key in current[0]})
        return load(state_dict)

    part.load_state_dict = load_with_current_settings


def _structure(group: dict) -> tuple:
    return tuple(group.get(key, group.get(f"pre_{key}")) for key in STRUCTURAL)


def _saved_param_groups(state):
    """Every parameter group in a (possibly nested) optimizer state dict."""
    if isinstance(state, dict):
        groups = state.get("param_groups")
        if isinstance(groups, list):
            yield from (group for group in groups if isinstance(group, dict))
        for key, value in state.items():
            if key != "param_groups":
                yield from _saved_param_groups(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_param_groups(value)


def _changes(saved: dict, scheduler, samples_per_step: int) -> list[str]:
    """The settings that differ, named as in the config (warm-up and length in iterations of the batch the run
    started with, the unit both are counted in)."""
    names = {
        "max_lr": ("optimizer.lr", 1), "min_lr": ("optimizer.min_lr", 1),
        "lr_warmup_steps": ("schedule.warmup_steps", samples_per_step),
        "lr_decay_steps": ("schedule.train_iters", samples_per_step),
        "lr_decay_style": ("schedule.decay_style", None), "start_wd": ("optimizer.weight_decay", 1),
    }
    changes = []
    for key, (name, scale) in names.items():
        before, now = saved.get(key), getattr(scheduler, key)
        if before is None or before == now:
            continue
        if scale is not None:
            before, now = f"{before / scale:g}", f"{now / scale:g}"
        changes.append(f"{name} {before} -> {now}")
    return changes
