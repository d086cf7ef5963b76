"""AdaGC: per-tensor adaptive gradient clipping (arXiv 2502.11034), as the SimReg paper trains.

Step t counts from 1. For t <= warmup_steps, plain global-norm clipping to `warmup_max_norm`, while each
tensor's threshold gamma_i starts at its first norm and then keeps the smallest norm seen. Afterwards a
tensor whose norm n_i exceeds lambda_rel * gamma_i is scaled down to that, and
gamma_i <- beta * gamma_i + (1 - beta) * min(n_i, lambda_rel * gamma_i).

Warm-up norms (`warmup_gamma`): by default ("clipped") gamma tracks each tensor's norm AFTER the warm-up's
global clipping, as the official Megatron patch (lishuai-97/AdaGC) does: it clips in place, then "collect[s
the] minimum clipped tensor-wise norm". "raw" tracks the norms before that clipping, which starts gamma
higher (up to the global clipping factor, 100x and more early in training) and so clips far less afterwards;
it is kept as an option for ablations.

Plain PyTorch + torch.distributed. A gradient may be a piece of its tensor: `GradShard` names the
process groups whose ranks hold the other pieces, and the core sums squared norms over them. Every rank
of such a group must pass the tensors reduced over it in the same order; a rank holding no piece of a
tensor passes an empty gradient. The state (step, gamma per tensor name) goes into checkpoints, so a
resumed run clips exactly as an uninterrupted one (the official code keeps gamma in memory only and
replays the warm-up after a restart).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

VARIANTS = ("tensor", "shard", "global")
WARMUP_GAMMAS = ("raw", "clipped")
GLOBAL_KEY = "<global>"


@dataclass
class AdaGCConfig:
    enabled: bool = True
    lambda_rel: float = 1.04
    beta: float = 0.99
    warmup_steps: int = 100
    warmup_max_norm: float = 1.0
    eps: float = 1e-6
    # "tensor": whole tensors; "shard": each model-parallel piece alone; "global": one threshold
    variant: str = "tensor"
    # warm-up gamma from norms after ("clipped", official patch) or before ("raw") global clipping
    warmup_gamma: str = "clipped"
    load_state: bool = True  # resume AdaGC's state with the checkpoint; false starts it afresh (warm-up again)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"adagc.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.warmup_gamma not in WARMUP_GAMMAS:
            raise ValueError(f"adagc.warmup_gamma must be one of {', '.join(WARMUP_GAMMAS)}, got {self.warmup_gamma!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"adagc.beta must lie in [0, 1), got {self.beta}")
        if self.lambda_rel <= 0 or self.warmup_max_norm <= 0:
            raise ValueError(
                f"adagc.lambda_rel ({self.lambda_rel}) and adagc.warmup_max_norm ({self.warmup_max_norm}) "
                "must be positive"
            )
        if self.warmup_steps < 1:
            raise ValueError(
                f"adagc.warmup_steps must be at least 1 (the warm-up sets the thresholds), got {self.warmup_steps}"
            )
        if self.eps < 0:
            raise ValueError(f"adagc.eps must not be negative, got {self.eps}")


@dataclass
class GradShard:
    """A gradient to clip in place (all or part of the tensor `name`) and where the rest of it lives.

    split_group: ranks across which the model splits the tensor (tensor parallelism); summed over for the
        `tensor` variant only, so `shard` clips each piece on its own.
    shard_group: ranks across which the optimizer shards the gradient (a distributed optimizer); always
        summed over, so the optimizer's layout never changes the result.
    global_group: ranks whose gradients make up the global norm (this pipeline stage's model-parallel
        peers and beyond); None for a single process.
    counted: False for a replica already counted in the global norm on another rank of `global_group`.
    """

    name: str
    grad: torch.Tensor
    split_group: dist.ProcessGroup | None = None
    shard_group: dist.ProcessGroup | None = None
    global_group: dist.ProcessGroup | None = None
    counted: bool = True


@dataclass
class AdaGCStats:
    step: int
    grad_norm: float  # global norm before clipping
    clipped_grad_norm: float  # global norm after
    num_clipped: int  # tensors scaled down this step, whole model
    min_clip_coeff: float  # smallest scale applied, whole model (1.0: none)

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
        cfg = self.config
        _check_unique(shards)
        self.step += 1
        device = shards[0].grad.device if shards else torch.device("cpu")
        grads = [s.grad for s in shards]
        squares = (
            torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double() ** 2
            if shards else torch.zeros(0, dtype=torch.float64)
        )
        counted = torch.tensor([s.counted for s in shards], dtype=torch.float64, device=device)
        global_before = math.sqrt(_global_square(shards, squares * counted))
        if not math.isfinite(global_before):  # every rank sees it alike: nothing clipped, no threshold moved
            self.step -= 1
            return AdaGCStats(self.step, global_before, global_before, 0, 1.0)
        if cfg.variant == "global":
            keys, norms = [GLOBAL_KEY] * len(shards), {GLOBAL_KEY: global_before}
        else:
            keys = [s.name for s in shards]
            norms = dict(zip(keys, _whole_tensor_squares(shards, squares, cfg.variant == "tensor").sqrt().tolist()))

        if self.step <= cfg.warmup_steps:
            coefficient = min(1.0, cfg.warmup_max_norm / (global_before + cfg.eps))
            tracked = coefficient if cfg.warmup_gamma == "clipped" else 1.0
            for key, norm in norms.items():
                seen = norm * tracked
                self.gamma[key] = seen if self.step == 1 else min(self._gamma(key), seen)
            per_key = dict.fromkeys(norms, coefficient)
        else:
            per_key = {}
            for key, norm in norms.items():
                gamma = self._gamma(key)
                limit = cfg.lambda_rel * gamma
                per_key[key] = limit / (norm + cfg.eps) if norm > limit else 1.0
                self.gamma[key] = cfg.beta * gamma + (1.0 - cfg.beta) * min(norm, limit)

        coefficients = [per_key[key] for key in keys]
        scaled = [(grad, c) for grad, c in zip(grads, coefficients) if c < 1.0 and grad.numel()]
        if scaled:
            torch._foreach_mul_([grad for grad, _ in scaled], [c for _, c in scaled])
        pieces_are_units = cfg.variant == "shard"
        after = _after_clipping(shards, squares * counted, coefficients, pieces_are_units)
        return AdaGCStats(self.step, global_before, *after)

    def _gamma(self, key: str) -> float:
        if key not in self.gamma:
            raise ValueError(
                f"AdaGC has no threshold for {key!r} at step {self.step}: the model has a tensor the loaded AdaGC "
                "state does not (resume with the parallel layout and model the checkpoint was saved with)"
            )
        return self.gamma[key]

    def state_dict(self) -> dict:
        return {"step": self.step, "gamma": dict(self.gamma), "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        """Restore step and thresholds; the current config's settings stay, except a changed variant is refused."""
        saved = state.get("config", {}).get("variant", self.config.variant)
        if saved != self.config.variant:
            raise ValueError(
                f"the AdaGC state was saved with adagc.variant={saved!r} but this run has {self.config.variant!r}: "
                f"set adagc.variant={saved} to resume, or start AdaGC afresh without its state"
            )
        self.step = int(state["step"])
        self.gamma = {str(k): float(v) for k, v in state["gamma"].items()}


def _check_unique(shards: list[GradShard]) -> None:
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"AdaGC got several gradients named {twice[:3]}: give every tensor its own name")


def _whole_tensor_squares(shards: list[GradShard], squares: torch.Tensor, include_split: bool) -> torch.Tensor:
    """Squared whole-tensor norms: each piece's square summed over the groups holding the other pieces."""
    totals = squares.clone()
    attributes = ("split_group", "shard_group") if include_split else ("shard_group",)
    for attribute in attributes:  # one fixed order on every rank
        by_group: dict[dist.ProcessGroup, list[int]] = {}
        for index, shard in enumerate(shards):
            group = getattr(shard, attribute)
            if group is not None:
                by_group.setdefault(group, []).append(index)
        for group, indices in by_group.items():
            positions = torch.tensor(indices, device=totals.device)
            values = totals[positions]
            dist.all_reduce(values, group=group)
            totals[positions] = values
    return totals


def _global_square(shards: list[GradShard], counted_squares: torch.Tensor) -> float:
    """The squared global norm: this rank's counted squares, summed over each global group."""
    total = 0.0
    for group, positions in _by_global_group(shards, counted_squares.device):
        value = counted_squares[positions].sum().reshape(1)
        if group is not None:
            dist.all_reduce(value, group=group)
        total += float(value)
    return total


def _after_clipping(shards: list[GradShard], counted_squares: torch.Tensor, coefficients: list[float],
                    pieces_are_units: bool) -> tuple:
    """Whole-model global norm after clipping, number of tensors clipped, and the smallest coefficient.

    A tensor is counted on one rank (the first of its split and shard groups, where it is not a replica);
    with `pieces_are_units` (the `shard` variant) each split piece counts on its own.
    """
    device = counted_squares.device

    def owns(s: GradShard) -> bool:
        groups = (s.shard_group,) if pieces_are_units else (s.split_group, s.shard_group)
        return s.counted and all(g is None or dist.get_rank(g) == 0 for g in groups)

    owner = torch.tensor(
        [owns(s) for s in shards],
        dtype=torch.float64, device=device,
    )
    coefficient = torch.tensor(coefficients, dtype=torch.float64, device=device)
    square, clipped, smallest = 0.0, 0, 1.0
    for group, positions in _by_global_group(shards, device):
        sums = torch.stack([(counted_squares[positions] * coefficient[positions] ** 2).sum(),
                            (owner[positions] * (coefficient[positions] < 1.0)).sum()])
        least = coefficient[positions].min().reshape(1)
        if group is not None:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(least, op=dist.ReduceOp.MIN, group=group)
        square, clipped = square + float(sums[0]), clipped + round(float(sums[1]))
        smallest = min(smallest, float(least))
    return math.sqrt(square), clipped, smallest


def _by_global_group(shards: list[GradShard], device) -> list[tuple]:
    by_group: dict[dist.ProcessGroup | None, list[int]] = {}
    for index, shard in enumerate(shards):
        by_group.setdefault(shard.global_group, []).append(index)
    return [(group, torch.tensor(indices, device=device)) for group, indices in by_group.items()]
