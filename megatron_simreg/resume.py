"""Resuming with changed optimizer settings (lr, min_lr, warm-up, length, decay style, weight decay).

After a stop the natural recovery is often a lower learning rate. megatron-core refuses that twice: the
optimizer matches the checkpoint's parameter groups by their settings (max_lr, min_lr, ... are part of the
key, so a new lr finds no group), and the scheduler asserts the checkpoint's values unless told to
override them (Megatron-LM's `--override-opt_param-scheduler`, which both loops set). `accept_changed_settings`
lets the config win in both places, as a user who changed it expects, and says in one line what changed.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core.optimizer.optimizer import param_group_identifier_keys

SCHEDULED = ("max_lr", "min_lr", "start_wd", "end_wd")  # per-group values the scheduler owns; the config's win
STRUCTURAL = tuple(key for key in param_group_identifier_keys if key not in SCHEDULED)


def accept_changed_settings(optimizer, scheduler, samples_per_step: int) -> None:
    """Make `optimizer.load_state_dict` and `scheduler.load_state_dict` accept a checkpoint saved with other
    settings (the scheduler must be built with override_opt_param_scheduler=True)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        _adopt_current_group_settings(part)
    load = scheduler.load_state_dict

    def load_and_report(state: dict) -> None:
        changes = _changes(state, scheduler, samples_per_step)
        load(state)
        if changes and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"resuming from iteration {state['num_steps'] // samples_per_step} with changed optimizer settings: "
                  + ", ".join(changes), flush=True)

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
    """The settings that differ, named as in the config (warm-up and length in iterations)."""
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
