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

Plain PyTorch (+ torch.distributed): no Megatron import. The pairwise work runs in tiles, flash-style:
no `s x s` matrix is kept for backward (only two log-sum-exps per token are saved, the tiles are
recomputed), and extra memory is O(block * s) rather than O(s^2); the symmetry of cos(h_i, h_j) halves it
(each pair of tiles once). When all of a call's pairs fit one tile, `megatron_simreg.simreg_dense` takes the
whole matrix at once instead (no tiling to pay for). The math is fp32 whatever the input dtype. On CUDA
tensors a fused Triton kernel (`megatron_simreg.simreg_triton`) does the same work (`kernel=`). Under
sequence or context parallelism each rank holds a slice of every sequence; chunk-wise SimReg then needs no
activation communication, full SimReg gathers the embeddings, and in both cases loss and gradients equal the
single-process result (see `simreg_loss`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import threading
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

NORM_EPS = 1e-12
"""Embeddings with a smaller norm are treated as `h / NORM_EPS` (as `F.normalize`): zero stays zero."""

ChunkSize = int | Literal["local"] | None
SequenceLayout = Literal["contiguous", "zigzag"]
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
) -> torch.Tensor:
    """Lsr per token, `[b, s]` float32 (-inf where N_i is empty, 0 at masked positions).

    hidden: `[b, s, h]`, or `[s, b, h]` with `sequence_first=True` (Megatron's layout, used as is).
    labels, loss_mask: `[b, s]`; loss_mask 1 marks valid tokens (anchors and pair members).
    chunk_size: None for full SimReg; an int for chunk-wise SimReg over that many consecutive tokens;
        "local" for chunks equal to each rank's slice (with a process group) or the whole sequence.
    process_group, sequence_layout, block_size, kernel: see `simreg_loss`.
    """
    run = _run(
        hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, sequence_layout, block_size,
        kernel,
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

    kernel: "auto" runs the fused Triton kernel (`megatron_simreg.simreg_triton`) on CUDA tensors when
    triton imports, the PyTorch one otherwise; "torch" or "triton" force one. block_size: the PyTorch
    kernel's tile side in tokens (the Triton kernel's tiles are at most 64); when batch * segment^2 <=
    block_size^2 the PyTorch kernel computes the whole matrix at once (`megatron_simreg.simreg_dense`).
    """
    if reduction not in ("group", "token"):
        raise ValueError(f"simreg reduction must be 'group' or 'token', got {reduction!r}")
    if not 0.0 < live_threshold < 1.0:
        raise ValueError(f"simreg live_threshold is a gradient weight sigmoid(Lsr), in (0, 1); got {live_threshold}")
    run = _run(
        hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, sequence_layout, block_size,
        kernel,
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


# ---------------------------------------------------------------------------------------------
# Planning: which tokens pair with which


@dataclass
class _Run:
    lsr: torch.Tensor  # [b, s] float32, -inf for anchors without a term (masked, or N_i empty)
    positive_count: torch.Tensor  # [b, s] float32, |P_i|
    valid: torch.Tensor  # [b, s] bool
    angles: torch.Tensor  # float64 [sum of the negative pairs' angles in degrees, number of negative pairs]


@dataclass
class _Plan:
    """Fixed, non-differentiable inputs of the pairwise kernel.

    The local sequence is cut into consecutive segments of `segment` tokens whose tokens pair only among
    themselves (chunks; the last is padded with invalid tokens), and the kernel works on all segments of
    all samples at once, as a batch `[b * segments, segment, ...]`. With `gather` the local tokens pair
    with the whole gathered sequence instead (one segment per sample).
    """

    labels: torch.Tensor  # [batch, segment] int64
    valid: torch.Tensor  # [batch, segment] bool
    segment: int
    gather: dist.ProcessGroup | None
    inv_temperature: float
    block_size: int
    dtype: torch.dtype  # float32, or float64 for float64 embeddings (gradcheck)


def _run(
    hidden, labels, loss_mask, temperature, chunk_size, sequence_first, process_group, layout, block_size, kernel
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
    )
    lsr, positive_count, angles = _kernel_function(kernel, hidden, plan).apply(batch_major, plan)
    return _Run(_unbatched(lsr, b, s), _unbatched(positive_count, b, s), valid, angles)


def _zigzag_pieces(s: int) -> list[tuple[int, int]]:
    if s % 2:
        raise ValueError(f"the zigzag (context-parallel) layout holds two equal halves per rank, got {s} local tokens")
    return [(0, s // 2), (s // 2, s)]


def _segments(pieces: list[tuple[int, int]], chunk_size: ChunkSize, split_across_ranks: bool) -> list[tuple[int, int]]:
    """Split the local contiguous pieces into the ranges whose tokens pair among themselves: consecutive,
    all of one length but the last (which `_batched` pads)."""
    if chunk_size is None or chunk_size == "local":
        return pieces
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"simreg chunk_size must be a positive int, 'local' or None (full), got {chunk_size!r}")
    segments = []
    for start, end in pieces:
        if split_across_ranks and (end - start) % chunk_size:
            raise ValueError(
                f"simreg chunk_size {chunk_size} does not divide this rank's contiguous piece of {end - start} tokens, "
                "so chunks would straddle ranks; choose a divisor or chunk_size='local'"
            )
        segments += [(c, min(c + chunk_size, end)) for c in range(start, end, chunk_size)]
    return segments


def _batched(per_token: torch.Tensor, segment: int) -> torch.Tensor:
    """`[b, s, ...]` as `[b * ceil(s / segment), segment, ...]`, the tail padded with zeros (False)."""
    b, s = per_token.shape[:2]
    padding = -s % segment
    if padding:
        per_token = torch.cat([per_token, per_token.new_zeros((b, padding, *per_token.shape[2:]))], dim=1)
    return per_token.reshape(-1, segment, *per_token.shape[2:])


def _unbatched(batched: torch.Tensor, b: int, s: int) -> torch.Tensor:
    return batched.reshape(b, -1, *batched.shape[2:])[:, :s]


def _kernel_function(kernel: Kernel, hidden: torch.Tensor, plan: _Plan):
    """The pairwise kernel: the fused Triton one for CUDA tensors when Triton imports and sets up ("auto"; else
    PyTorch's, said once), or the one asked for."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"simreg kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
    if kernel == "torch" or (kernel == "auto" and not hidden.is_cuda):
        return _torch_kernel(plan)
    simreg_triton, problem = _triton()
    if problem is not None and kernel == "auto":
        _say_once(f"simreg: the Triton kernel cannot run here ({problem}); using the PyTorch kernel")
        return _torch_kernel(plan)
    if problem is not None:
        raise ValueError(f"simreg.kernel=triton: {problem}; set simreg.kernel=torch or auto")
    if not hidden.is_cuda and not simreg_triton.INTERPRETED:
        raise ValueError(
            "simreg kernel 'triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, set before "
            "megatron_simreg.simreg_triton is imported); use kernel='torch' or 'auto' on CPU"
        )
    return simreg_triton.SimRegTritonFunction


@functools.cache
def _triton():
    """(megatron_simreg.simreg_triton, None) once it imports and Triton sets up, else (None, what is missing)."""
    try:
        from megatron_simreg import simreg_triton

        simreg_triton.check_setup()
    except ModuleNotFoundError as error:
        return None, f"the {error.name} package is not installed"
    except Exception as error:  # an old or broken Triton fails in its own ways: AttributeError, RuntimeError, ...
        return None, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return simreg_triton, None


@functools.cache
def _say_once(line: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)


def _torch_kernel(plan: _Plan):
    """PyTorch's: the whole matrix at once when all pairs fit one tile (`simreg_dense`), tiles otherwise."""
    from megatron_simreg import simreg_dense

    return simreg_dense.DenseSimRegFunction if simreg_dense.fits(plan) else _SimRegFunction


# ---------------------------------------------------------------------------------------------
# The pairwise kernel (PyTorch; `megatron_simreg.simreg_triton` is the fused GPU kernel with the same contract)

MASKED = 1e30
"""Subtracted from the logits of pairs outside a set: after the shift and EXP_FLOOR their exponential is
e^-80, below float32's resolution of any sum here; unlike -inf, MASKED - MASKED is 0, not NaN."""

EXP_FLOOR = -80.0
"""Exponents are raised to at least this before `exp`: e^-80 ~ 1.8e-35 is still a normal float32, so no
subnormal number reaches an `exp`, a product or a matrix product (x86 CPUs take up to ~200x longer on those,
as the logits span 2/tau = 200 at tau = 0.01), and `exp` never sees -1e30 either (its vectorised version
takes ~100x longer on arguments that far out). What the floor adds stays below float32's resolution: every
sum is taken relative to its largest term (>= 1), and in backward every term is a softmax weight (sum 1)."""

NEGLIGIBLE_WEIGHT = 2 * math.exp(EXP_FLOOR)
"""Backward's pair weights at or below this (the floor's e^-80, from pairs whose true weight is smaller still)
become 0 before the matrix products: e^-80 times a unit component below ~1e-3 is a subnormal product, and the
rows of anchors whose gradient has vanished (Lsr far below 0, softplus' slope ~1e-40) are all floor, which
doubled the time of the products on x86 CPUs. Each such pair moves the gradient by less than 1e-33."""


class _SimRegFunction(torch.autograd.Function):
    """Lsr per token from the embeddings; saves only per-token scalars and recomputes tiles in backward.

    z_ij = cos(h_i, h_j) / tau is symmetric and, within a segment, anchors and keys are the same tokens: each
    tile pair (I, J) with I < J is computed once, its rows feeding anchors I and its columns anchors J, in
    forward (the log-sum-exps) and in backward (both gradient directions); diagonal tiles once. That is
    two `s x s x h` products in all (half of z forward, half again backward, and d/dU = W U over the
    symmetric W). Under sequence or context parallelism full SimReg pairs the local anchors with the
    gathered sequence: anchors and keys differ, so tiles are not mirrored there (each rank computes its own
    anchors' rows against all keys, as before), which keeps it exactly the single-process value.

    Per tile: the negatives' log-sum-exp needs each row's (and column's) maximum over its negatives; the
    positives' needs none, as the largest positive logit of a normalised anchor is its own z_ii = 1/tau
    (Cauchy-Schwarz), so one exp over the tile serves the positive sums of its rows and of its columns.
    Zero vectors (|h| < NORM_EPS, whose logits are all ~0) break that bound; tiles holding one take the
    maximum as for negatives. Masks come from labels as float tiles, not boolean tensors (slow on CPU).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, plan: _Plan):
        with ieee_fp32_products():
            pairs = _Pairs.of(hidden, plan)
            lse_pos, lse_neg, angle_sum = _forward_tiles(pairs, plan)
        lsr, lse_neg = _lsr(lse_pos, lse_neg, pairs.negative_count)
        angles = torch.stack([angle_sum, pairs.negative_count.sum(dtype=torch.float64)])
        ctx.plan = plan
        ctx.pairs = pairs.without_units()  # per-token values only: backward recomputes the units from `hidden`
        ctx.save_for_backward(hidden, lse_pos, lse_neg)
        ctx.mark_non_differentiable(pairs.positive_count, angles)
        ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs' gradients
        return lsr, pairs.positive_count, angles

    @staticmethod
    def backward(ctx, grad_lsr, _grad_count, _grad_angles):
        hidden, lse_pos, lse_neg = ctx.saved_tensors
        plan: _Plan = ctx.plan
        if grad_lsr is None:  # Lsr took no part in what is differentiated
            return None, None
        grad = _anchor_gradients(grad_lsr, lse_neg, plan.dtype)
        if not grad.any() and plan.gather is None:  # lambda = 0: nothing to recompute
            return torch.zeros_like(hidden), None
        with ieee_fp32_products():
            pairs = ctx.pairs.with_units(hidden, plan)
            grad_units = _backward_tiles(pairs, plan, _logit_weights(lse_pos, lse_neg, grad))
            _drop_radial_part_(grad_units, pairs.anchors.units, pairs.anchors.short, plan)
        del pairs  # the units: the gradient in the input's layout takes their place
        return _gradient_in_layout(grad_units, ctx.pairs.anchors.token_scale, hidden, plan.segment), None


def _gradient_in_layout(grad_units: torch.Tensor, token_scale: torch.Tensor, hidden: torch.Tensor, segment: int):
    """d loss / d hidden = scale * (d loss / d units, radial part dropped), in the input's own memory layout, so
    adding it to the other gradients of `hidden` (and what reduces them downstream) runs in the same order as
    without SimReg: lambda = 0 changes no bit."""
    grad_hidden = torch.empty_like(hidden)
    if grad_units.numel() == hidden.numel():  # whole segments, no padding: one product
        torch.mul(grad_units.view(hidden.shape), token_scale[..., None], out=grad_hidden)
        return grad_hidden
    segmented = grad_units.unflatten(0, (hidden.shape[0], -1))
    parts = zip(_segment_parts(grad_hidden, segment), _segment_parts(token_scale, segment))
    for (part, at), (part_scale, _) in parts:
        torch.mul(segmented[:, at, : part.shape[2]], part_scale[..., None], out=part)
    return grad_hidden


_precision_lock = threading.Lock()
_precision_depth = 0
_precision_saved: tuple[str, str] | None = None


@contextlib.contextmanager
def ieee_fp32_products():
    """Float32 matrix products in IEEE precision inside, whatever the global setting (TF32 on GPUs, which NGC
    images turn on with TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1; bf16 in oneDNN on CPUs). At tau = 0.01 a logit is a
    cosine times 100: TF32's 2^-11 rounding of the inputs moves it by ~1e-2 and the loss by ~1e-5 relative.

    torch keeps the setting per process, not per thread: the first holder saves and sets it, the last restores
    it (also on exceptions); other threads' float32 products in between run in IEEE precision too.
    """
    global _precision_depth, _precision_saved
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    with _precision_lock:
        if _precision_depth == 0:
            _precision_saved = tuple(backend.fp32_precision for backend in backends)
            for backend in backends:
                backend.fp32_precision = "ieee"
        _precision_depth += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_depth -= 1
            if _precision_depth == 0:
                for backend, precision in zip(backends, _precision_saved):
                    backend.fp32_precision = precision


@dataclass
class _Side:
    """The tokens on one side of the tiles, batched like `_Plan`: `[batch, length, ...]`, plan.dtype."""

    units: torch.Tensor | None  # [batch, length, h] h * scale: z_ij = units_i . units_j (None while saved)
    token_scale: torch.Tensor  # [b, s] 1 / (max(|h|, eps) * sqrt(tau)), as the hidden states are laid out
    segment: int  # tokens per segment, before the padding to whole blocks
    scale: torch.Tensor  # token_scale, batched
    short: torch.Tensor  # bool, |h| < NORM_EPS: |u| < 1, so z_ii = 1/tau no longer bounds the row
    labels: torch.Tensor  # the label as `_kernel_labels` gives it (>= 0); -1 for invalid tokens
    valid: torch.Tensor  # 1.0 for valid tokens, 0.0 for invalid ones
    bias: torch.Tensor  # 0 for valid tokens, -MASKED for invalid ones: added to z, it drops their pairs


@dataclass
class _Pairs:
    """What the tiles need: both sides (the same object unless the plan gathers) and the set sizes."""

    anchors: _Side
    keys: _Side
    positive_count: torch.Tensor  # [batch, length] |P_i|: valid keys with the anchor's label (i itself included)
    negative_count: torch.Tensor  # [batch, length] |N_i| for valid anchors (the sides are padded to whole blocks)
    symmetric: bool
    tiling: tuple | None = None  # (strips, strips holding invalid tokens, strips holding short vectors), once known

    @classmethod
    def of(cls, hidden: torch.Tensor, plan: _Plan) -> "_Pairs":
        key_labels, key_valid = _pairing_partners(plan.labels, plan.valid, plan)
        key_ids = _kernel_labels(key_labels)
        anchor_ids = _local_share(key_ids, plan)
        positive_count, negative_count = _set_sizes(anchor_ids, key_ids, key_valid, plan.valid, plan.dtype)
        anchors = _side(hidden, plan.segment, anchor_ids, plan.valid, plan)
        if plan.gather is None:
            return cls(anchors, anchors, positive_count, negative_count, symmetric=True)
        gathered = _all_gather_sequence(hidden, plan.gather)
        keys = _side(gathered, gathered.shape[1], key_ids, key_valid, plan)
        return cls(anchors, keys, positive_count, negative_count, symmetric=False)

    def strips(self, plan: _Plan) -> tuple[list[_Strip], list[bool], list[bool]]:
        """The strips, and which of them hold invalid tokens or zero vectors (their general path)."""
        if self.tiling is None:
            strips = _strips(plan, self)
            a, k = self.anchors, self.keys
            self.tiling = (strips, _strips_touching(strips, a.valid == 0, k.valid == 0),
                           _strips_touching(strips, a.short, k.short))
        return self.tiling

    def without_units(self) -> "_Pairs":
        anchors = dataclasses.replace(self.anchors, units=None)
        keys = anchors if self.symmetric else dataclasses.replace(self.keys, units=None)
        return dataclasses.replace(self, anchors=anchors, keys=keys)

    def with_units(self, hidden: torch.Tensor, plan: _Plan) -> "_Pairs":
        anchors = dataclasses.replace(self.anchors, units=_units(hidden, self.anchors, plan))
        if self.symmetric:
            return dataclasses.replace(self, anchors=anchors, keys=anchors)
        keys = dataclasses.replace(self.keys, units=_units(_all_gather_sequence(hidden, plan.gather), self.keys, plan))
        return dataclasses.replace(self, anchors=anchors, keys=keys)


def _pairing_partners(labels: torch.Tensor, valid: torch.Tensor, plan: _Plan):
    """The keys' labels and validity: the anchors' own, or the gathered sequence's."""
    if plan.gather is None:
        return labels, valid
    return _all_gather_sequence(labels, plan.gather), _all_gather_sequence(valid, plan.gather)


def _local_share(gathered: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """This rank's own tokens out of a gathered `[b, world * s, ...]` tensor (all of it without a gather)."""
    if plan.gather is None:
        return gathered
    rank = dist.get_rank(plan.gather)
    return gathered[:, rank * plan.segment : (rank + 1) * plan.segment]


FLOAT32_EXACT_LABELS = 2**24
"""Integers below this are exact float32 numbers (and int32 ones): the PyTorch tiles compare labels as float32
numbers, the Triton ones as int32."""


def _kernel_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as both kernels compare them: themselves when every one is in [0, 2^24), as token ids of any
    vocabulary are; otherwise their ranks among those present (a sort, skipped in the common case)."""
    if labels.numel() == 0:
        return labels
    low, high = torch.stack(torch.aminmax(labels)).tolist()
    if low >= 0 and high < FLOAT32_EXACT_LABELS:
        return labels
    return torch.unique(labels, return_inverse=True)[1]


def _set_sizes(anchor_ids, key_ids, key_valid, anchor_valid, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """|P_i| and |N_i| per anchor (`dtype`), |N_i| = 0 for invalid anchors: an anchor has a term iff |N_i| > 0."""
    positive = _positive_counts(anchor_ids, key_ids, key_valid).to(dtype)
    return positive, _negative_counts(positive, key_valid, anchor_valid)


def _negative_counts(positive: torch.Tensor, key_valid: torch.Tensor, anchor_valid: torch.Tensor) -> torch.Tensor:
    """|N_i| from |P_i|: the valid keys not in P_i, 0 for invalid anchors."""
    return (key_valid.sum(-1, keepdim=True, dtype=positive.dtype) - positive) * anchor_valid


def _lsr(lse_pos: torch.Tensor, lse_neg: torch.Tensor, negative_count: torch.Tensor):
    """Lsr per anchor, and lse_neg as backward reads it: both -inf for anchors without a term."""
    has_term = negative_count > 0
    lse_neg = torch.where(has_term, lse_neg, -math.inf)
    return torch.where(has_term, lse_neg - lse_pos, -math.inf), lse_neg


def _anchor_gradients(grad_lsr: torch.Tensor, lse_neg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d Lsr_i in `dtype`, 0 for anchors without a term (masked, or N_i empty: lse_neg = -inf)."""
    return torch.where(lse_neg > -math.inf, grad_lsr.to(dtype), 0.0)


def _positive_counts(anchor_labels: torch.Tensor, key_labels: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """|P_i| for every anchor (invalid ones too): the valid keys of its segment with its label, by sorting, not
    pairs. A valid key with label l sorts as 2l, an invalid one as 2l + 1; an anchor counts the keys at 2l."""
    keys = torch.sort(key_labels * 2 + key_valid.logical_not(), dim=-1).values
    wanted = anchor_labels * 2
    return torch.searchsorted(keys, wanted, right=True) - torch.searchsorted(keys, wanted)


def _token_scales(hidden: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of `hidden` `[b, s, h]`: the scale 1 / (max(|h|, eps) sqrt(tau)) that makes z_ij = u_i . u_j,
    and whether |h| < NORM_EPS (a short vector: |u| < 1, so z_ii = 1/tau no longer bounds its row)."""
    norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=plan.dtype)
    return (norms.clamp_min(NORM_EPS) * math.sqrt(1.0 / plan.inv_temperature)).reciprocal_(), norms < NORM_EPS


def _side(hidden: torch.Tensor, segment: int, label_ids: torch.Tensor, valid: torch.Tensor, plan: _Plan) -> _Side:
    """The tokens of `hidden` `[b, s, h]` cut into segments, each padded to a whole number of blocks."""
    scale, short = _token_scales(hidden, plan)
    padded = _padding(_padded_length(segment, plan.block_size))
    side = _Side(
        units=None,
        token_scale=scale,
        segment=segment,
        scale=padded(_batched(scale, segment), 0.0),
        short=padded(_batched(short, segment), False),
        labels=padded(torch.where(valid, label_ids.to(plan.dtype), -1.0), -1.0),
        valid=padded(valid.to(plan.dtype), 0.0),
        bias=padded(torch.where(valid, 0.0, -MASKED).to(plan.dtype), -MASKED),
    )
    side.units = _units(hidden, side, plan)
    return side


def _units(hidden: torch.Tensor, side: _Side, plan: _Plan) -> torch.Tensor:
    return _segment_units(hidden, side.token_scale, side.segment, side.labels.shape[1], plan.dtype)


def _segment_units(hidden: torch.Tensor, token_scale: torch.Tensor, segment: int, length: int, dtype: torch.dtype):
    """`hidden * token_scale` (z_ij = units_i . units_j) cut into segments `[batch, length, h]` (`dtype`), each
    padded with zero vectors to `length` tokens."""
    b, s, h = hidden.shape
    units = hidden.new_empty((b, -(-s // segment), length, h), dtype=dtype)
    if units.numel() == hidden.numel():  # whole segments, no padding: one product
        torch.mul(hidden, token_scale[..., None], out=units.view(b, s, h))
        return units.view(-1, length, h)
    units[:, :, segment:] = 0
    for (part, at), (part_scale, _) in zip(_segment_parts(hidden, segment), _segment_parts(token_scale, segment)):
        units[:, at, part.shape[2] : segment] = 0  # the tail of a shorter last segment
        torch.mul(part, part_scale[..., None], out=units[:, at, : part.shape[2]])
    return units.view(-1, length, h)


def _padded_length(segment: int, block: int) -> int:
    """Segments longer than a block are padded (with invalid tokens) to whole blocks: every tile is `block` wide."""
    return segment if segment <= block else -(-segment // block) * block


def _padding(length: int):
    """Pads `[batch, segment, ...]` per-token values to `length` tokens with `value`."""

    def padded(per_token: torch.Tensor, value) -> torch.Tensor:
        missing = length - per_token.shape[1]
        if not missing:
            return per_token
        tail = per_token.new_full((per_token.shape[0], missing, *per_token.shape[2:]), value)
        return torch.cat([per_token, tail], dim=1)

    return padded


def _segment_parts(per_token: torch.Tensor, segment: int) -> list[tuple[torch.Tensor, slice]]:
    """`[b, s, ...]` as views `[b, segments, tokens, ...]` over whole segments, then the shorter last one, with the
    segments they are: how a segmented copy lines up with the unsegmented tensor without reshaping (copying) it."""
    b, s = per_token.shape[:2]
    whole = s // segment
    parts = [(per_token[:, : whole * segment].unflatten(1, (whole, segment)), slice(0, whole))] if whole else []
    if s % segment:
        parts.append((per_token[:, whole * segment :, None].transpose(1, 2), slice(whole, whole + 1)))
    return parts


@dataclass(frozen=True)
class _Strip:
    """Anchors of one block (`rows`) of some segments against consecutive blocks of their keys (`cols`).

    In a symmetric plan the keys start at the anchors' own block: the strip's columns beyond that block
    (from `mirrored`, a column offset) also stand for the transposed tiles, whose anchors they are.
    """

    segments: slice
    rows: slice
    cols: slice
    row_block: int  # index of the anchors' block: the partial slot of the mirrored columns
    col_block: int  # index of the first key block: the partial slots of the rows are col_block, col_block + 1, ...
    blocks: int  # key blocks in the strip
    mirrored: int  # first mirrored column; cols.stop - cols.start if none

    @property
    def is_mirrored(self) -> bool:
        return self.mirrored < self.cols.stop - self.cols.start


def _strips(plan: _Plan, pairs: _Pairs) -> list[_Strip]:
    """Strips of one block of anchors against up to 4 blocks of keys (as many as the hidden size allows, so the
    scratch stays below three blocks of units): larger products and fewer operations than single tiles.
    Short segments share a strip, up to `block x block` pairs."""
    batch, rows, h = pairs.anchors.units.shape
    cols = pairs.keys.units.shape[1]
    row_block, col_block = min(rows, plan.block_size), min(cols, plan.block_size)
    width = max(1, min(4, h // col_block))
    per_strip = max(1, plan.block_size**2 // (row_block * col_block))
    strips = []
    for segments in _blocks(batch, per_strip):
        for i in range(rows // row_block):
            first = i if pairs.symmetric else 0
            for j in range(first, cols // col_block, width):
                blocks = min(width, cols // col_block - j)
                mirrored = col_block if pairs.symmetric and j == i else (0 if pairs.symmetric else blocks * col_block)
                strips.append(_Strip(
                    segments, slice(i * row_block, (i + 1) * row_block), slice(j * col_block, (j + blocks) * col_block),
                    i, j, blocks, mirrored,
                ))
    return strips


def _strips_touching(strips: list[_Strip], rows: torch.Tensor | None, cols: torch.Tensor | None) -> list[bool]:
    """Per strip: does any of its anchors (per `rows`) or keys (per `cols`; None: no token) need the general path?
    One check per strip, and none at all in the common case where no token does."""
    rows, cols = (None if flags is None or not bool(flags.any()) else flags for flags in (rows, cols))
    if rows is None and cols is None:
        return [False] * len(strips)

    def touching(flags: torch.Tensor | None, segments: slice, tokens: slice) -> bool:
        return flags is not None and bool(flags[segments, tokens].any())

    return [touching(rows, t.segments, t.rows) or touching(cols, t.segments, t.cols) for t in strips]


THREADED_PRODUCT_MACS = 2**24
"""Strips whose products are smaller than this many multiply-adds leave torch's thread count alone: changing it
costs the operations after it, in SimReg and in the model (thread pools resume: ~40 us for the next bmm here),
more than one-thread passes save on strips that small. A product of 2^24 multiply-adds takes ~0.3 ms on one
core of this project's CPU."""


@contextlib.contextmanager
def _serial_between_products(strips: list[_Strip], hidden_size: int):
    """Inside, elementwise work runs on one thread; `product(operation, *args)` runs a matrix product on torch's
    threads. Small strips (THREADED_PRODUCT_MACS) run everything as torch would, the thread count untouched.

    A strip's elementwise passes are many short operations; on threads they each end in a barrier, and on a
    shared machine every barrier waits for a descheduled sibling thread (on this project's 2-core VM, with
    other jobs running, a 2-thread clamp of 512 x 1024 took 8 ms against 0.2 ms on one thread, and SimReg
    4x attention). torch keeps its thread count per process: it is lowered for the loop and restored
    after it, also on exceptions.
    """
    threads = torch.get_num_threads()
    largest = max(math.prod(_Workspace.shape(strip)) for strip in strips) * hidden_size
    if threads == 1 or largest < THREADED_PRODUCT_MACS:
        yield lambda operation, *args, **kwargs: operation(*args, **kwargs)
        return

    def product(operation, *args, **kwargs):
        torch.set_num_threads(threads)
        try:
            return operation(*args, **kwargs)
        finally:
            torch.set_num_threads(1)

    torch.set_num_threads(1)
    try:
        yield product
    finally:
        torch.set_num_threads(threads)


def _same_label(row_labels: torch.Tensor, col_labels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """1.0 where the labels agree, else 0.0, written straight into the float tile (one pass; a boolean mask and
    its conversion took eight times as long on CPU)."""
    return torch.eq(row_labels[:, :, None], col_labels[:, None, :], out=out)


class _Workspace:
    """Strip-sized scratch tensors reused from strip to strip: no allocation (and no page faults) per strip."""

    def __init__(self, count: int, strips: list[_Strip], like: torch.Tensor):
        self.flat = [like.new_empty(max(math.prod(self.shape(t)) for t in strips)) for _ in range(count)]

    @staticmethod
    def shape(strip: _Strip) -> tuple[int, int, int]:
        return tuple(r.stop - r.start for r in (strip.segments, strip.rows, strip.cols))

    def views(self, strip: _Strip) -> list[torch.Tensor]:
        shape = self.shape(strip)
        return [flat[: math.prod(shape)].view(shape) for flat in self.flat]


def _by_block(strip_tensor: torch.Tensor, strip: _Strip) -> torch.Tensor:
    """`[n, rows, blocks * block]` as `[n, rows, blocks, block]`: per-tile reductions along the last dim."""
    return strip_tensor.unflatten(-1, (strip.blocks, -1))


def _forward_tiles(pairs: _Pairs, plan: _Plan):
    """Per anchor the positives' and negatives' log-sum-exps (any value for an empty set), and the angle sum."""
    a, k = pairs.anchors, pairs.keys
    strips, irregular, short = pairs.strips(plan)
    # Each tile leaves one partial (max, sum) per anchor and set, in the slot of the other side's block.
    slots = (*a.labels.shape, k.labels.shape[1] // min(k.labels.shape[1], plan.block_size))
    partials = _Partials(*(a.labels.new_zeros(slots) for _ in range(4)))
    angle_sum = torch.zeros((), dtype=torch.float64, device=a.units.device)
    workspace = _Workspace(3, strips, a.units)
    with _serial_between_products(strips, a.units.shape[-1]) as product:
        for strip, masked, general in zip(strips, irregular, short):
            scratch = workspace.views(strip)
            angle_sum += _forward_strip(strip, masked, general, pairs, plan, scratch, product, partials)
    segment = pairs.positive_count.shape[1]
    lse_pos = _combine(partials.pos_max[:, :segment], partials.pos_sum[:, :segment])
    lse_neg = _combine(partials.neg_max[:, :segment], partials.neg_sum[:, :segment])
    return lse_pos, lse_neg, angle_sum * (180.0 / math.pi)


@dataclass
class _Partials:
    """Per anchor and set, one (max, sum of exp(z - max)) per tile, `[batch, length, key blocks]`."""

    pos_max: torch.Tensor
    pos_sum: torch.Tensor
    neg_max: torch.Tensor
    neg_sum: torch.Tensor


def _strip_logits(strip: _Strip, masked, pairs: _Pairs, product, z: torch.Tensor, same: torch.Tensor) -> None:
    """Into `z` the strip's logits (invalid tokens' bias added where the strip holds one), into `same` its
    same-label mask: what forward and backward both compute for a strip."""
    a, k = pairs.anchors, pairs.keys
    at, rows, cols = strip.segments, strip.rows, strip.cols
    product(torch.bmm, a.units[at, rows], k.units[at, cols].transpose(1, 2), out=z)
    if masked:
        z.add_(a.bias[at, rows, None]).add_(k.bias[at, None, cols])
    _same_label(a.labels[at, rows], k.labels[at, cols], out=same)


def _forward_strip(strip: _Strip, masked, general, pairs: _Pairs, plan: _Plan, scratch, product, partials):
    """The strip's partials (its rows', and its mirrored columns'), and the sum of its negative pairs' angles."""
    a, k = pairs.anchors, pairs.keys
    at, rows, cols, m = strip.segments, strip.rows, strip.cols, strip.mirrored
    z, same, work = scratch
    _strip_logits(strip, masked, pairs, product, z, same)
    radians = _negative_angles(z, same, plan, work, (a.valid[at, rows], k.valid[at, cols]) if masked else None)
    # Row sums in the tile's dtype (at most 4 blocks of terms <= pi each), then float64 across rows: a float64
    # sum over the whole tile took ten times longer than the float32 one.
    angle_sum = radians.sum(-1).sum(dtype=torch.float64) + radians[..., m:].sum(-1).sum(dtype=torch.float64)

    row_slots = (at, rows, slice(strip.col_block, strip.col_block + strip.blocks))
    col_slots = (at, slice(cols.start + m, cols.stop), strip.row_block)
    negatives = torch.add(z, same, alpha=-MASKED, out=work)
    partials.neg_max[row_slots], partials.neg_sum[row_slots] = _shifted_sums(_by_block(negatives, strip), -1)
    if strip.is_mirrored:  # afresh: the rows' sums consumed the tile
        negatives = torch.add(z[..., m:], same[..., m:], alpha=-MASKED, out=work[..., m:])
        partials.neg_max[col_slots], partials.neg_sum[col_slots] = _shifted_sums(negatives, -2)
    if general:  # a zero vector: the positives' maxima, as the negatives'
        positives = z.add_(torch.sub(same, 1.0, out=work), alpha=MASKED)
        row_sums = _shifted_sums(_by_block(work.copy_(positives), strip), -1)
        partials.pos_max[row_slots], partials.pos_sum[row_slots] = row_sums
        if strip.is_mirrored:
            partials.pos_max[col_slots], partials.pos_sum[col_slots] = _shifted_sums(positives[..., m:], -2)
    else:  # one exp for rows and columns
        terms = _positive_terms(z, same, plan, out=z)
        partials.pos_max[row_slots], partials.pos_sum[row_slots] = plan.inv_temperature, _by_block(terms, strip).sum(-1)
        if strip.is_mirrored:
            partials.pos_max[col_slots], partials.pos_sum[col_slots] = plan.inv_temperature, terms[..., m:].sum(-2)
    return angle_sum


def _positive_terms(z: torch.Tensor, same: torch.Tensor, plan: _Plan, out: torch.Tensor) -> torch.Tensor:
    """exp(z - 1/tau) at positive pairs, 0 elsewhere, into `out` (which may be z): the largest positive logit of
    a normalised anchor is its own, 1/tau, so these are the positives' shifted terms for rows and columns alike."""
    return torch.sub(z, plan.inv_temperature, out=out).clamp_min_(EXP_FLOOR).exp_().mul_(same)


def _shifted_sums(masked: torch.Tensor, dim: int):
    """(max, sum of exp(x - max)) along `dim` of a tile whose pairs outside the set hold -MASKED; in place."""
    top = masked.amax(dim, keepdim=True).clamp_min_(-MASKED / 2)  # an empty set keeps a finite max
    return top.squeeze(dim), masked.sub_(top).clamp_min_(EXP_FLOOR).exp_().sum(dim)


def _combine(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of a set from its tiles' partial (max, sum) pairs along the last dim."""
    if maxes.shape[-1] == 1:  # one key block: nothing to rescale
        return sums.squeeze(-1).log() + maxes.squeeze(-1)
    top = maxes.amax(-1, keepdim=True)
    return (sums * (maxes - top).clamp_min_(EXP_FLOOR).exp_()).sum(-1).log_() + top.squeeze(-1)


def _negative_angles(z, same, plan: _Plan, out, valid) -> torch.Tensor:
    """The angles (radians) of the strip's different-label pairs, 0 elsewhere (and, with `valid`, at invalid pairs)."""
    radians = torch.mul(z, 1.0 / plan.inv_temperature, out=out).clamp_(-1.0, 1.0).acos_()
    radians.addcmul_(radians, same, value=-1.0)
    if valid is not None:
        radians.mul_(valid[0][:, :, None]).mul_(valid[1][:, None, :])
    return radians


def _logit_weights(lse_pos: torch.Tensor, lse_neg: torch.Tensor, grad: torch.Tensor):
    """Per anchor (shift, step, sign): grad_i * |d Lsr_i / d z_ij| = sign_i * exp(z_ij - shift_i + same_ij * step_i).

    d Lsr_i / d z_ij is the softmax over N_i (for negatives) minus the softmax over P_i (for positives); log|g_i| is
    folded into the exponent, so the tile's exponentials are already the gradient's magnitudes.
    """
    live = grad != 0  # other rows are zeroed by their sign; MASKED keeps their exponentials finite till then
    shift = torch.where(live, lse_neg - grad.abs().log(), MASKED)
    step = torch.where(live, lse_neg - lse_pos, 0.0)
    return shift, step, grad.sign()


def _pair_weights(z, same, shift, step, out: torch.Tensor | None = None) -> torch.Tensor:
    """|G_ij| = exp(z_ij - shift + same_ij * step) (see `_logit_weights`, broadcast along the anchors' side), into
    `out` if given (which may be z), floored and with the floor's negligible weights set to 0."""
    weights = torch.sub(z, shift, out=out).addcmul_(same, step).clamp_min_(EXP_FLOOR).exp_()
    return torch.threshold_(weights, NEGLIGIBLE_WEIGHT, 0.0)


def _backward_tiles(pairs: _Pairs, plan: _Plan, weights) -> torch.Tensor:
    """d loss / d units for the anchors: sum_j (G_ij + G_ji) u_j over the symmetric W = G + G^T."""
    a, k = pairs.anchors, pairs.keys
    key_weights = weights if pairs.symmetric else _gather_scalars(plan, *weights)
    # Padded to the sides' whole blocks: the padding's rows get a finite shift and sign 0.
    anchor_side, key_side = (
        tuple(_padding(side.labels.shape[1])(w, fill) for w, fill in zip(ws, (MASKED, 0.0, 0.0)))
        for ws, side in ((weights, a), (key_weights, k))
    )
    strips, irregular, _ = pairs.strips(plan)
    signed_rows = _strips_touching(strips, anchor_side[2] != 1, None)
    signed_cols = _strips_touching(strips, None, key_side[2] != 1)
    grad_units = torch.zeros_like(a.units)
    workspace = _Workspace(3, strips, a.units)
    with _serial_between_products(strips, a.units.shape[-1]) as product:
        for strip, masked, signs in zip(strips, irregular, zip(signed_rows, signed_cols)):
            scratch = workspace.views(strip)
            _backward_strip(strip, masked, signs, pairs, (anchor_side, key_side), scratch, product, grad_units)
    return grad_units


def _backward_strip(strip: _Strip, masked, signs, pairs: _Pairs, weights, scratch, product, grad_units) -> None:
    """Adds the strip's share of d loss / d units: W u_J to its anchors, W^T u_I to its mirrored keys."""
    a, k = pairs.anchors, pairs.keys
    (shift, step, sign), (key_shift, key_step, key_sign) = weights
    at, rows, cols, m = strip.segments, strip.rows, strip.cols, strip.mirrored
    z, same, w = scratch
    _strip_logits(strip, masked, pairs, product, z, same)
    # G_ij: anchor i's weight on key j (rows); G_ji: anchor j's weight on key i (columns).
    _pair_weights(z, same, shift[at, rows, None], step[at, rows, None], out=w)
    if signs[0]:
        w.mul_(sign[at, rows, None])
    col_w = _pair_weights(z, same, key_shift[at, None, cols], key_step[at, None, cols], out=z)
    if signs[1]:
        col_w.mul_(key_sign[at, None, cols])
    w.add_(col_w).addcmul_(same, w, value=-2.0)  # + for negatives, - for positives
    if masked:
        w.mul_(a.valid[at, rows, None]).mul_(k.valid[at, None, cols])
    product(grad_units[at, rows].baddbmm_, w, k.units[at, cols])
    if strip.is_mirrored:
        product(grad_units[at, cols.start + m : cols.stop].baddbmm_, w[..., m:].transpose(1, 2), a.units[at, rows])


def _drop_radial_part_(grad_units: torch.Tensor, units: torch.Tensor, short: torch.Tensor | None, plan: _Plan) -> None:
    """The normalisation's backward but for the final factor: units = h * scale, scale = 1 / (max(|h|, eps)
    sqrt(tau)), so d loss / d h = scale * (g - tau (units . g) units), the radial part dropping out unless
    |h| < eps (`short`; None: no such vector) (g = d loss / d units, changed in place; the caller multiplies by
    the scale)."""
    flat_units, grads = units.view(-1, units.shape[-1]), grad_units.view(-1, grad_units.shape[-1])
    blocks = _blocks(flat_units.shape[0], plan.block_size)
    radial = [torch.linalg.vecdot(flat_units[at], grads[at]) for at in blocks]
    radial = (radial[0] if len(radial) == 1 else torch.cat(radial)).view(units.shape[:-1])
    radial.mul_(1.0 / plan.inv_temperature)
    if short is not None:
        radial.masked_fill_(short, 0.0)
    grad_units.addcmul_(units, radial[..., None], value=-1.0)


def _gather_scalars(plan: _Plan, *per_token: torch.Tensor) -> list[torch.Tensor]:
    gathered = _all_gather_sequence(torch.stack(per_token, dim=-1), plan.gather)
    return list(gathered.unbind(-1))


def _all_gather_sequence(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `[b, s_local, ...]` slice along the sequence (rank order)."""
    world = dist.get_world_size(group)
    sequence_major = local.transpose(0, 1).contiguous()
    out = sequence_major.new_empty((world * sequence_major.shape[0], *sequence_major.shape[1:]))
    if out.dtype == torch.bool:  # gloo and nccl collectives do not take bool
        dist.all_gather_into_tensor(out.view(torch.uint8), sequence_major.view(torch.uint8), group=group)
    else:
        dist.all_gather_into_tensor(out, sequence_major, group=group)
    return out.transpose(0, 1)


def _blocks(length: int, size: int):
    """Consecutive ranges of at most `size` tokens: tiles are `[size, size]`, whatever the length is."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]
