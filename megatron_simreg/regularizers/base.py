"""What every regularizer shares: its inputs, its output, the pairing settings and the per-sequence sum.

Every regularizer is, like SimReg, a sum of per-sequence terms: it returns `token_weighted_sum` =
sum_seq S_seq * T_seq (T_seq the sequence's valid tokens) and the objective adds weight * that sum to the
cross-entropy's token sum, so micro-batches, accumulation and data parallelism never change what is trained.
The baselines are per-token means inside a sequence (S_seq = mean over its tokens of L_i), so their
token-weighted sum is the plain sum of L_i over valid tokens.

Under sequence or context parallelism each rank holds a slice of every sequence; values are global (summed
over the ranks) while each rank's gradient is its own share, as in `megatron_simreg.simreg`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

NORM_EPS = 1e-12  # as SimReg: a zero vector stays zero when normalised


@dataclass
class RegularizerInputs:
    """What the output processor hands a regularizer (sequence-first, Megatron's layout, this rank's slice).

    hidden: `[s, b, h]` final hidden states (after the final norm); labels, loss_mask: `[b, s]`.
    sequence_group / sequence_layout: the ranks holding other slices of the same sequences and how the slice
        is cut ("contiguous" under sequence parallelism, "zigzag" under context parallelism); None: whole sequences.
    label_embeddings(): `[s, b, h]` the output layer's rows of the labels (vocabulary-parallel lookup).
    logits(x): vocabulary-parallel logits `[s_logits, b, v]` of hidden states `x` `[s, b, h]` through the output
        layer; `logit_mask` `[b, s_logits]` marks their valid tokens, `logit_group` the ranks holding the other
        tokens of those sequences (context parallelism), `vocab_group` the ranks holding the other vocabulary parts.
    second_view: `[s, b, h]` final hidden states of a second forward with hidden and attention dropout
        (views "forward").
    target_view: `[s, b, h]` final hidden states of the momentum encoder, no gradient (SCE's target "ema").
    training: False in evaluation, where no view is dropped out (validation values are deterministic).
    """

    hidden: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor | None = None
    sequence_group: dist.ProcessGroup | None = None
    sequence_layout: str = "contiguous"
    label_embeddings: Callable[[], torch.Tensor] | None = None
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    logit_mask: torch.Tensor | None = None
    logit_group: dist.ProcessGroup | None = None
    vocab_group: dist.ProcessGroup | None = None
    second_view: torch.Tensor | None = None
    target_view: torch.Tensor | None = None
    training: bool = True

    @property
    def valid(self) -> torch.Tensor:
        """`[b, s]` bool: the tokens that are anchors and pair members."""
        b, s = self.labels.shape
        if self.loss_mask is None:
            return torch.ones(b, s, dtype=torch.bool, device=self.hidden.device)
        return self.loss_mask.to(self.hidden.device) > 0


@dataclass
class RegularizerOutput:
    """The lambda-free term and what is logged beside it (the value under the regularizer's own name)."""

    loss: torch.Tensor  # the batch value: token_weighted_sum / tokens
    token_weighted_sum: torch.Tensor  # differentiable: sum_seq S_seq * T_seq, global value, this rank's gradient share
    tokens: torch.Tensor  # sum_seq T_seq over the sequence group
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PairingSettings:
    """Which tokens pair, shared by the pairwise regularizers: as SimReg's `mode` / `chunk_size`.

    mode "full": pairs across the whole sequence (under SP/CP the keys are gathered); "chunk": pairs within
    `chunk_size` consecutive tokens (None: each rank's slice under SP/CP, no activation communication).
    block_size: tile size of the pairwise work (memory O(block * s), nothing of size s x s kept).
    """

    mode: str = "full"
    chunk_size: int | None = None
    block_size: int = 512

    def __post_init__(self):
        check_choice("mode", self.mode, ("full", "chunk"))
        if self.mode == "full" and self.chunk_size is not None:
            raise ValueError("regularizer.chunk_size is set but regularizer.mode is full: "
                             "set mode=chunk, or chunk_size=null")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"regularizer.chunk_size must be a positive number of tokens, got {self.chunk_size}")
        if self.block_size < 1:
            raise ValueError(f"regularizer.block_size must be positive, got {self.block_size}")

    def chunk(self):
        """SimReg's `chunk_size` argument: None (full), an int, or "local" (each rank's slice)."""
        if self.mode == "full":
            return None
        return "local" if self.chunk_size is None else self.chunk_size


def check_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"regularizer.{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"regularizer.{key} must be positive, got {value}")


def check_fraction(key: str, value: float, closed: bool = False) -> None:
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ValueError(f"regularizer.{key} must be in [0, 1{']' if closed else ')'}, got {value}")


def batch_major(x: torch.Tensor) -> torch.Tensor:
    """`[s, b, ...]` (Megatron's layout) as `[b, s, ...]`."""
    return x.transpose(0, 1)


def units(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors in fp32 (fp64 stays fp64) whatever the activation dtype."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=NORM_EPS)


def two_views(inputs: RegularizerInputs, views: str, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views `[s, b, h]` of the final hidden states.

    "forward": the cross-entropy pass's states and those of a second model forward with hidden and attention
    dropout (`inputs.second_view`, run by the objective), the faithful and twice as costly option.
    "dropout": dropout p applied twice (independent masks) to the final hidden states, the cheap option.
    In evaluation neither drops anything out: both views are the final states.
    """
    if views == "forward":
        if inputs.second_view is None:
            raise ValueError("regularizer.views=forward needs the second forward's hidden states (inputs.second_view)")
        return inputs.hidden, inputs.second_view
    return dropped_out(inputs, inputs.hidden, dropout), dropped_out(inputs, inputs.hidden, dropout)


def dropped_out(inputs: RegularizerInputs, x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout p on `x` in training; `x` itself in evaluation."""
    return F.dropout(x, p, training=inputs.training)


def global_sum(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum of `local` over the group's ranks as the value; the gradient stays this rank's share."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    total = local.detach().double()
    dist.all_reduce(total, group=group)
    return local + (total.to(local.dtype) - local.detach())


def mean_output(name: str, parts: dict[str, tuple[torch.Tensor, dist.ProcessGroup | None]], tokens: torch.Tensor,
                tokens_group: dist.ProcessGroup | None, weights: dict[str, float] | None = None) -> RegularizerOutput:
    """A per-token-mean regularizer's output from its parts' local sums of per-token losses.

    parts: name -> (this rank's sum of the part's per-token losses, the group over which its tokens are spread).
    The value is sum_part weight * part_sum / tokens; each part is logged as `<name> <part>` when there are several.
    """
    weights = weights or {}
    tokens = global_sum(tokens.to(torch.float64), tokens_group).detach()
    sums = {part: global_sum(local, group) for part, (local, group) in parts.items()}
    weighted = sum(weights.get(part, 1.0) * value for part, value in sums.items())
    denominator = tokens.clamp_min(1.0).to(weighted.dtype)
    stats = {name: weighted.detach() / denominator}
    if len(sums) > 1:
        stats.update({f"{name} {part}": value.detach() / denominator for part, value in sums.items()})
    return RegularizerOutput(loss=weighted / denominator, token_weighted_sum=weighted, tokens=tokens.to(weighted.dtype),
                             stats=stats)
