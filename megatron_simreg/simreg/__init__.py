"""SimReg: embedding-similarity regularization (arXiv 2605.08809, Eq. 3).

For the final-layer embeddings h_i of one sequence and their next-token labels y_i,

    phi(i, j) = exp(cos(h_i, h_j) / tau)
    P_i = {valid j : y_j == y_i}  (i itself included)      N_i = {valid j : y_j != y_i}
    Lsr_i = log sum_{j in N_i} phi(i, j) - log sum_{j in P_i} phi(i, j)

Pairs are taken inside one sequence, or inside one chunk of it (chunk-wise SimReg). The regulariser is a sum
of per-sequence terms, so how a global batch is cut into micro-batches and data-parallel ranks never changes
it (Megatron's contract for the cross-entropy):

    S_seq = mean over the sequence's label groups (chunk, label) of the group's mean softplus(Lsr_i)
            (reduction "group", the default; frequent tokens do not dominate), or
          = mean over the sequence's anchors of softplus(Lsr_i)                    (reduction "token");
    batch value = sum_seq S_seq * T_seq / sum_seq T_seq,  T_seq = the sequence's valid tokens

i.e. the token-weighted mean over sequences (the plain mean for packed pretraining sequences). The training
objective adds lambda * sum_seq S_seq * T_seq to the cross-entropy's token sum, so both are normalised alike.

Plain PyTorch (+ torch.distributed): no Megatron import. The math is fp32 whatever the input dtype. Under
sequence or context parallelism each rank holds a slice of every sequence; chunk-wise SimReg then needs no
activation communication, full SimReg gathers the embeddings, and in both cases loss and gradients equal the
single-process result (see `simreg_loss`). The package, each module importing only those listed after it:

    __init__    this API: checks the arguments, plans the call, picks the kernel, reduces Lsr to the loss
    triton      the fused Triton kernel for CUDA tensors: setup and launches (imported on first use: Triton is
                optional)
    triton_jit  its Triton programs
    dense       PyTorch, the whole matrix at once, when all of a call's pairs fit one tile
    tiles       PyTorch in tiles, flash-style (memory O(block * s)): long sequences
    base        the constants, precision context and per-token arithmetic the kernels share
    exchange    the gathers under sequence or context parallelism
    plan        segments, layouts and labels: which tokens pair with which
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_simreg.simreg.base import NORM_EPS
from megatron_simreg.simreg.dense import DenseSimRegFunction, fits
from megatron_simreg.simreg.plan import (
    ChunkSize,
    SequenceLayout,
    _batched,
    _Plan,
    _segments,
    _unbatched,
    _zigzag_pieces,
)
from megatron_simreg.simreg.tiles import _SimRegFunction

__all__ = ["NORM_EPS", "ChunkSize", "Kernel", "SequenceLayout", "SimRegOutput", "simreg_loss", "simreg_terms"]

Kernel = Literal["auto", "torch", "triton"]


@dataclass
class SimRegOutput:
    """The scalar lambda-free SimReg term and the statistics worth logging beside it.

    `loss == token_weighted_sum / tokens`. Under sequence or context parallelism both are global values
    (over the process group) while gradients flow only into this rank's share.
    """

    loss: torch.Tensor  # differentiable scalar: the batch value, sum_seq S_seq * T_seq / sum_seq T_seq
    token_weighted_sum: torch.Tensor  # differentiable: sum_seq S_seq * T_seq, what the objective adds
    tokens: torch.Tensor  # sum_seq T_seq: valid tokens (anchors) over the process group
    lsr_mean: torch.Tensor  # mean Lsr over anchors with a non-empty N_i
    live_fraction: torch.Tensor  # share of anchors whose gradient weight sigmoid(Lsr_i) >= live_threshold
    negative_angle: torch.Tensor  # mean angle (degrees) between different-label pairs

    def stats(self) -> dict[str, float]:
        """The logged statistics as plain floats."""
        return {
            "simreg": self.loss.item(),
            "simreg lsr": self.lsr_mean.item(),
            "simreg live anchors": self.live_fraction.item(),
            "simreg negative angle": self.negative_angle.item(),
        }


def simreg_terms(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    temperature: float = 0.01,
    chunk_size: ChunkSize = None,
    *,
    sequence_first: bool = False,
    process_group: dist.ProcessGroup | None = None,
    sequence_layout: SequenceLayout = "contiguous",
    block_size: int = 512,
    kernel: Kernel = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Lsr per token, `[b, s]` float32 (-inf where N_i is empty, 0 at masked positions).

    hidden: `[b, s, h]`, or `[s, b, h]` with `sequence_first=True` (Megatron's layout, used as is).
    labels, loss_mask: `[b, s]`; loss_mask 1 marks valid tokens (anchors and pair members).
    chunk_size: None for full SimReg; an int for chunk-wise SimReg over that many consecutive tokens;
        "local" for chunks equal to each rank's slice (with a process group) or the whole sequence.
    process_group, sequence_layout, block_size, kernel, deterministic: see `simreg_loss`.
    """
    run = _run(
        hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, sequence_layout, block_size,
        kernel, deterministic,
    )
    return torch.where(run.valid, run.lsr, 0.0)


def simreg_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    temperature: float = 0.01,
    chunk_size: ChunkSize = None,
    reduction: Literal["group", "token"] = "group",
    *,
    sequence_first: bool = False,
    process_group: dist.ProcessGroup | None = None,
    sequence_layout: SequenceLayout = "contiguous",
    block_size: int = 512,
    live_threshold: float = 1e-3,
    kernel: Kernel = "auto",
    deterministic: bool = False,
) -> SimRegOutput:
    """The SimReg term (without lambda): per-sequence means of softplus(Lsr_i), token-weighted over sequences.

    reduction="group": each sequence's value is the mean over its label groups (chunk, label) of the mean
    over each group's anchors, so frequent tokens do not dominate; "token": the mean over its anchors. The
    batch value weights each sequence by its valid tokens (see the module docstring).

    With `process_group` every rank holds a slice of each sequence: the contiguous slice `rank` of
    `world` equal parts (`sequence_layout="contiguous"`, Megatron's sequence parallelism), or chunks
    `rank` and `2*world-1-rank` of `2*world` (`"zigzag"`, Megatron's context parallelism). Labels
    and mask are the rank's own slice too. Chunk-wise SimReg (`chunk_size` int or "local", where
    "local" means each contiguous local piece) exchanges only scalars; full SimReg (`chunk_size=None`)
    all-gathers the embeddings. Every rank returns the global value; the gradient reaching each
    rank's `hidden` is that of the global loss, as in the single-process computation.

    kernel: "auto" runs the fused Triton kernel (`megatron_simreg.simreg.triton`) on CUDA tensors when
    triton imports, the PyTorch one otherwise; "torch" or "triton" force one. block_size: the PyTorch
    kernel's tile side in tokens (the Triton kernel's tiles are at most 64); when batch * segment^2 <=
    block_size^2 the PyTorch kernel computes the whole matrix at once (`megatron_simreg.simreg.dense`).
    deterministic: the same gradient bits from the same inputs on every run; on by itself under torch's
    deterministic algorithms (`torch.use_deterministic_algorithms`, which Megatron's --deterministic-mode sets).
    The PyTorch kernels always are; the Triton kernel's backward then runs without atomics, at about twice
    the tile work. On CUDA tensors the Triton path reads nothing back from the GPU (no host synchronisation);
    a caller that logs SimReg without training on it (lambda = 0) passes `hidden.detach()`, so no backward
    runs, nor, with a process group, its collective.
    """
    if reduction not in ("group", "token"):
        raise ValueError(f"simreg reduction must be 'group' or 'token', got {reduction!r}")
    if not 0.0 < live_threshold < 1.0:
        raise ValueError(f"simreg live_threshold is a gradient weight sigmoid(Lsr), in (0, 1); got {live_threshold}")
    run = _run(
        hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, sequence_layout, block_size,
        kernel, deterministic,
    )
    valid = run.valid.to(run.lsr.dtype)
    # A group of g anchors gives each 1/g, so its members sum to 1: the weights of a sequence sum to its groups.
    weights = valid / run.positive_count.clamp_min(1) if reduction == "group" else valid
    terms = F.softplus(run.lsr)  # softplus(-inf) = 0: anchors without a term add nothing

    lsr = run.lsr.detach()
    has_term = lsr > -math.inf
    live = lsr >= math.log(live_threshold / (1.0 - live_threshold))  # sigmoid(Lsr_i) >= live_threshold
    # Per sequence, this rank's share: sum of weighted terms, the normaliser, valid tokens, the statistics' sums.
    sums = torch.stack([terms.detach() * weights, weights, valid, lsr.nan_to_num(neginf=0.0), has_term, live]).sum(-1)
    angle_sum, angle_count = run.angles
    if process_group is not None:  # a sequence's groups and tokens span the ranks: add up its sums
        shared = torch.cat([sums.double().flatten(), run.angles])
        dist.all_reduce(shared, group=process_group)
        sums = shared[:-2].view_as(sums).to(sums.dtype)
        angle_sum, angle_count = shared[-2:]
    sequence_sums, normalizers, sequence_tokens = sums[:3]
    lsr_sum, with_negatives, live_count = sums[3:].sum(-1)

    # S_seq * T_seq, summed; each rank differentiates its own share: d / d softplus(Lsr_i) = w_i * T_seq / norm_seq.
    scale = sequence_tokens / normalizers.clamp_min(1.0)
    token_weighted_sum = torch.dot(terms.flatten(), (weights * scale[:, None]).flatten())
    if process_group is not None:
        token_weighted_sum = token_weighted_sum + ((sequence_sums * scale).sum() - token_weighted_sum).detach()
    tokens = sequence_tokens.sum()
    anchors = tokens.clamp_min(1.0)
    return SimRegOutput(
        loss=token_weighted_sum / anchors,
        token_weighted_sum=token_weighted_sum,
        tokens=tokens,
        lsr_mean=lsr_sum / with_negatives.clamp_min(1.0),
        live_fraction=live_count / anchors,
        negative_angle=(angle_sum / angle_count.clamp_min(1.0)).to(sums.dtype),
    )


@dataclass
class _Run:
    lsr: torch.Tensor  # [b, s] float32, -inf for anchors without a term (masked, or N_i empty)
    positive_count: torch.Tensor  # [b, s] float32, |P_i|
    valid: torch.Tensor  # [b, s] bool
    angles: torch.Tensor  # float64 [sum of the negative pairs' angles in degrees, number of negative pairs]


def _run(
    hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, layout, block_size, kernel,
    deterministic,
):
    batch_major = hidden.transpose(0, 1) if sequence_first else hidden
    if batch_major.dim() != 3:
        raise ValueError("simreg expects hidden [b, s, h] (or [s, b, h] with sequence_first=True), "
                         f"got {tuple(hidden.shape)}")
    b, s, _ = batch_major.shape
    if tuple(labels.shape) != (b, s):
        raise ValueError(
            f"simreg labels have shape {tuple(labels.shape)} but hidden holds [b={b}, s={s}] tokens; "
            "pass labels (and loss_mask) as [b, s] for this rank's own slice of the sequence"
        )
    if loss_mask is None:
        valid = torch.ones(b, s, dtype=torch.bool, device=hidden.device)
    elif tuple(loss_mask.shape) != (b, s):
        raise ValueError(f"simreg loss_mask has shape {tuple(loss_mask.shape)}, expected [b={b}, s={s}] like labels")
    else:
        valid = loss_mask.to(device=hidden.device) > 0
    if temperature <= 0:
        raise ValueError(f"simreg temperature must be positive, got {temperature}")
    if block_size < 1:
        raise ValueError(f"simreg block_size must be positive, got {block_size}")
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"simreg sequence_layout must be 'contiguous' or 'zigzag', got {layout!r}")

    pieces = [(0, s)] if layout == "contiguous" or process_group is None else _zigzag_pieces(s)
    distributed = process_group is not None and dist.get_world_size(process_group) > 1
    gather = process_group if (chunk_size is None and distributed) else None
    segments = _segments(pieces, chunk_size, split_across_ranks=distributed)
    segment = s if gather is not None else segments[0][1] - segments[0][0]
    plan = _Plan(
        labels=_batched(labels.to(device=hidden.device, dtype=torch.long), segment),
        valid=_batched(valid, segment),
        segment=segment,
        gather=gather,
        inv_temperature=1.0 / temperature,
        block_size=block_size,
        dtype=torch.promote_types(hidden.dtype, torch.float32),
        deterministic=deterministic or torch.are_deterministic_algorithms_enabled(),
    )
    lsr, positive_count, angles = _kernel_function(kernel, hidden, plan).apply(batch_major, plan)
    return _Run(_unbatched(lsr, b, s), _unbatched(positive_count, b, s), valid, angles)


def _kernel_function(kernel: Kernel, hidden: torch.Tensor, plan: _Plan):
    """The pairwise kernel: the fused Triton one for CUDA tensors when Triton imports and sets up ("auto"; else
    PyTorch's, said once), or the one asked for."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"simreg kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
    if kernel == "torch" or (kernel == "auto" and not hidden.is_cuda):
        return _torch_kernel(plan)
    triton_kernel, problem = _triton()
    if problem is not None and kernel == "auto":
        _say_once(f"simreg: the Triton kernel cannot run here ({problem}); using the PyTorch kernel")
        return _torch_kernel(plan)
    if problem is not None:
        raise ValueError(f"simreg.kernel=triton: {problem}; set simreg.kernel=torch or auto")
    if not hidden.is_cuda and not triton_kernel.INTERPRETED:
        raise ValueError(
            "simreg kernel 'triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, set before "
            "megatron_simreg.simreg.triton is imported); use kernel='torch' or 'auto' on CPU"
        )
    return triton_kernel.SimRegTritonFunction


@functools.cache
def _triton():
    """(megatron_simreg.simreg.triton, None) once it imports and Triton sets up, else (None, what is missing)."""
    try:
        from megatron_simreg.simreg import triton as triton_kernel

        triton_kernel.check_setup()
    except ModuleNotFoundError as error:
        return None, f"the {error.name} package is not installed"
    except Exception as error:  # an old or broken Triton fails in its own ways: AttributeError, RuntimeError, ...
        return None, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return triton_kernel, None


@functools.cache
def _say_once(line: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)


def _torch_kernel(plan: _Plan):
    """PyTorch's: the whole matrix at once when all pairs fit one tile (`dense`), tiles otherwise."""
    return DenseSimRegFunction if fits(plan) else _SimRegFunction
