"""AdaGC: per-tensor adaptive gradient clipping (arXiv 2502.11034), as the SimReg paper trains.

Step t counts from 1. For t <= warmup_steps, plain global-norm clipping to `warmup_max_norm`, while each
tensor's threshold gamma_i starts at its first norm and then keeps the smallest norm seen. Afterwards a
tensor whose norm n_i exceeds lambda_rel * gamma_i is scaled down to that, and
gamma_i <- beta * gamma_i + (1 - beta) * min(n_i, lambda_rel * gamma_i).

Plain PyTorch + torch.distributed. A gradient may be a shard of its tensor (tensor parallelism, a
distributed optimizer): each `GradShard` names the groups over which its squared norm is summed to get
the whole tensor's norm, and whether it counts towards the global norm on this rank (replicas count
once). The state (step, gamma per tensor name) goes into checkpoints, so a resumed run clips exactly
as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

VARIANTS = ("tensor", "shard", "global")
GLOBAL_KEY = "<global>"


@dataclass
class AdaGCConfig:
    enabled: bool = True
    lambda_rel: float = 1.04
    beta: float = 0.99
    warmup_steps: int = 100
    warmup_max_norm: float = 1.0
    eps: float = 1e-6
    variant: str = "tensor"  # "tensor": per whole tensor; "shard": per local shard; "global": one threshold

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"adagc.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"adagc.beta must lie in [0, 1), got {self.beta}")
        if self.lambda_rel <= 0 or self.warmup_max_norm <= 0:
            raise ValueError("adagc.lambda_rel and adagc.warmup_max_norm must be positive")


@dataclass
class GradShard:
    """A gradient to clip in place, with how its whole-tensor norm is assembled."""

    name: str
    grad: torch.Tensor
    norm_groups: tuple = ()  # process groups over which this tensor's squared norm is summed
    global_groups: tuple = ()  # process groups over which the global squared norm is summed
    counted: bool = True  # False on ranks that hold a replica already counted elsewhere


@dataclass
class AdaGCStats:
    step: int
    grad_norm: float  # global norm before clipping
    clipped_grad_norm: float  # global norm after
    num_clipped: int  # tensors clipped this step (after warm-up) or 0/all (warm-up)
    min_clip_coeff: float

    def as_dict(self) -> dict[str, float]:
        return {
            "grad-norm": self.grad_norm,
            "grad-norm clipped": self.clipped_grad_norm,
            "adagc clipped tensors": float(self.num_clipped),
            "adagc min coeff": self.min_clip_coeff,
        }


@dataclass
class AdaGC:
    config: AdaGCConfig = field(default_factory=AdaGCConfig)
    step: int = 0
    gamma: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def clip(self, shards: list[GradShard]) -> AdaGCStats:
        """Clip `shards` in place for the next optimizer step; return what to log."""
        self.step += 1
        cfg = self.config
        squares = _local_squares(shards)
        global_before = math.sqrt(_global_square(shards, squares))
        if cfg.variant == "global":
            keys = [GLOBAL_KEY] * len(shards)
            norms = {GLOBAL_KEY: torch.tensor(global_before, dtype=torch.float64)}
        else:
            keys = [shard.name for shard in shards]
            norms = _tensor_norms(shards, squares, reduce=cfg.variant == "tensor")

        if self.step <= cfg.warmup_steps:
            coefficient = min(1.0, cfg.warmup_max_norm / (global_before + cfg.eps))
            for key, norm in norms.items():
                value = float(norm)
                self.gamma[key] = value if self.step == 1 or key not in self.gamma else min(self.gamma[key], value)
            coefficients = torch.full((len(shards),), coefficient, dtype=torch.float64)
            num_clipped = len(shards) if coefficient < 1.0 else 0
        else:
            per_key = {}
            for key, norm in norms.items():
                value = float(norm)
                gamma = self.gamma.get(key, value)
                limit = cfg.lambda_rel * gamma
                per_key[key] = limit / (value + cfg.eps) if value > limit else 1.0
                self.gamma[key] = cfg.beta * gamma + (1.0 - cfg.beta) * min(value, limit)
            coefficients = torch.tensor([per_key[key] for key in keys], dtype=torch.float64)
            num_clipped = int((coefficients < 1.0).sum())

        scaled = [s.grad for s, c in zip(shards, coefficients.tolist()) if c < 1.0]
        if scaled:
            torch._foreach_mul_(scaled, [c for c in coefficients.tolist() if c < 1.0])
        global_after = math.sqrt(_global_square(shards, squares * coefficients.to(squares.dtype) ** 2))
        return AdaGCStats(self.step, global_before, global_after, num_clipped, float(coefficients.min()) if len(shards) else 1.0)

    def state_dict(self) -> dict:
        return {"step": self.step, "gamma": dict(self.gamma), "config": vars(self.config).copy()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.gamma = {str(k): float(v) for k, v in state["gamma"].items()}


def _local_squares(shards: list[GradShard]) -> torch.Tensor:
    if not shards:
        return torch.zeros(0, dtype=torch.float64)
    norms = torch._foreach_norm([s.grad.float() if s.grad.dtype != torch.float32 else s.grad for s in shards])
    return torch.stack(norms).double().cpu() ** 2


def _tensor_norms(shards, squares, reduce: bool) -> dict[str, torch.Tensor]:
    """Whole-tensor norms: local squares summed over each shard's groups (batched per group set)."""
    totals = squares.clone()
    if reduce:
        by_groups: dict[tuple, list[int]] = {}
        for index, shard in enumerate(shards):
            if shard.norm_groups:
                by_groups.setdefault(tuple(shard.norm_groups), []).append(index)
        for groups, indices in by_groups.items():
            values = totals[indices].to(shards[indices[0]].grad.device)
            for group in groups:
                dist.all_reduce(values, group=group)
            totals[indices] = values.cpu()
    return {shard.name: totals[i].sqrt() for i, shard in enumerate(shards)}


def _global_square(shards, squares) -> float:
    by_groups: dict[tuple, float] = {}
    for shard, square in zip(shards, squares.tolist()):
        by_groups.setdefault(tuple(shard.global_groups), 0.0)
        if shard.counted:
            by_groups[tuple(shard.global_groups)] += square
    total = 0.0
    device = shards[0].grad.device if shards else "cpu"
    for groups, value in by_groups.items():
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        for group in groups:
            dist.all_reduce(tensor, group=group)
        total += float(tensor)
    return total
