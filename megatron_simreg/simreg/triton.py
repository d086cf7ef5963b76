"""SimReg's pairwise kernel fused in Triton, for CUDA tensors (written by hand: no library fuses this loss).

Same contract as the PyTorch kernel in `tiles` (`_SimRegFunction`, the CPU path and the
reference this one is tested against): Lsr per token, |P_i|, the angle statistic, and in backward the
gradient of the hidden states in their own layout and dtype. Nothing `s x s` is ever in memory.

Forward: one program per (tile pair, segment). It computes the tile z = cos / tau from the hidden states in
their own dtype (bf16 from Megatron, the sequence-first layout read in place through strides; products
accumulate in fp32 over the hidden size in `BLOCK_K` slices), its masks from the labels and validity, and per
row (and, for an off-diagonal tile of a symmetric plan, per column: z is symmetric, so the tile also stands
for its transpose) a partial (max, sum) for the positives and for the negatives, with one exp per element
and side: the shift is the row's own maximum over the element's set. Partials are combined per token
afterwards (a few small PyTorch ops over `[tokens, s / BLOCK]`), like the per-tile partials of the PyTorch path.

Backward: one program per (tile pair, segment) recomputes the tile, forms W = G + G^T (G_ij = g_i dLsr_i/dz_ij,
from the saved log-sum-exps) and adds W u_J into the anchors' and W^T u_I into the keys' fp32 gradient
(atomically: every block of rows gets contributions from many tiles, and with h up to 8192 the
accumulators cannot stay on chip), then a row kernel applies the normalisation's backward and writes the
gradient in the input's layout and dtype. Like FlashAttention's dq accumulation, the atomic order makes the
last bits of the gradient vary from run to run.

Full SimReg under sequence/context parallelism (a gathered key sequence) runs the same kernels unmirrored:
local anchor rows against all gathered keys, as the PyTorch path does.

The tiling with per-tile (max, sum) partials and recomputation in backward follows FlashAttention and
Inf-CL's tile-wise contrastive loss; unlike attention (head size 128), SimReg's "head" is the whole hidden
size, so the gradient accumulators live in global memory rather than in registers.

Precision of the products, against the float64 SimReg (tau = 0.01, anisotropic embeddings, relative errors
of the loss / of the gradient's norm; `python -m megatron_simreg.bench.simreg_precision`, which emulates the
roundings on any machine and runs the kernels themselves on a GPU):

    bf16 input, bf16 x bf16 products, fp32 accumulation:  loss exact up to fp32 sums; W rounded to bf16 in
        backward: gradient 1.5e-4 to 1.6e-4 (W in TF32 would give 2e-5), below the 2^-9 ~ 2e-3 rounding of
        the bf16 gradient it becomes, so the bf16 tensor-core product is kept.
    fp32 input, TF32 products: loss 6e-6 to 1.8e-5, gradient 5.3e-4 to 6.0e-4: too coarse for an fp32 run;
        "tf32x3" (three TF32 products, fp32-level: 1e-9 / 7e-8) is the default, `DOT_PRECISION`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatron_simreg.simreg.base import MASKED, NORM_EPS, _anchor_gradients, _combine, _lsr, _set_sizes
from megatron_simreg.simreg.exchange import _all_gather_sequence, _local_share, _pairing_partners
from megatron_simreg.simreg.plan import _batched, _kernel_labels

if not hasattr(triton, "knobs"):  # older images ship Triton 3.1 to 3.3
    raise ImportError(f"triton >= 3.4 needed (triton.knobs), found {triton.__version__}")

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""Whether these kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import): then on CPU tensors."""

BLOCK = 64
"""Tile side on a GPU (rows and columns). `block_size` below 64 picks a smaller power of two (>= 16)."""
BLOCK_K = 64
"""Slice of the hidden size per product step."""
NUM_WARPS = 8
"""Warps per tile program: with 4, a 64 x 64 tile's fp32 state spills registers (checked by compiling for sm_90)."""
NORMALIZE_TOKENS = 16
"""Tokens per program of the normalisation's backward."""
DOT_PRECISION = "tf32x3"
"""How fp32 inputs (and the fp32 W of backward) enter the tensor cores (see the module docstring). bf16 and
fp16 inputs are multiplied as they are, accumulating in fp32; in backward W is rounded to bf16 for bf16
inputs, and stays fp32 for fp16 ones (whose range W's small weights would underflow)."""

_MASKED = tl.constexpr(MASKED)
_UPCAST = tl.constexpr(INTERPRETED)  # the interpreter multiplies bf16 as raw bits: hand it float32 (exact) instead


def check_setup() -> None:
    """Raise now what would stop the first kernel launch: on a GPU, Triton's driver compiles its launcher with the
    system's C compiler ("Failed to find C compiler") and needs the CUDA driver."""
    if not INTERPRETED and torch.cuda.is_available():
        triton.runtime.driver.active.get_current_target()


class SimRegTritonFunction(torch.autograd.Function):
    """`tiles._SimRegFunction`'s contract, computed by the Triton kernels below."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, plan):
        hidden, keys = _operands(hidden, plan)
        setup = _Setup.of(hidden, keys, plan)
        partials = hidden.new_empty((setup.segments, setup.length, setup.key_blocks, 4), dtype=torch.float32)
        angles = hidden.new_zeros((setup.segments, setup.tiles), dtype=torch.float32)
        _forward_kernel[(setup.tiles, setup.segments)](
            hidden, keys, setup.scale, setup.key_scale, setup.labels, setup.key_labels, setup.tile_rows,
            setup.tile_cols, partials, angles, *setup.shape_args(hidden, keys), setup.key_blocks, setup.temperature,
            SYMMETRIC=setup.symmetric, BLOCK=setup.block, BLOCK_K=BLOCK_K, PRECISION=_precision(hidden),
            num_warps=NUM_WARPS,
        )
        lse_pos = _combine(partials[..., 0], partials[..., 1])
        lsr, lse_neg = _lsr(lse_pos, _combine(partials[..., 2], partials[..., 3]), setup.negative_count)
        negative_pairs = setup.negative_count.sum(dtype=torch.float64)
        angle_stats = torch.stack([angles.sum(dtype=torch.float64) * (180.0 / math.pi), negative_pairs])
        ctx.plan, ctx.setup = plan, setup  # per-token values only
        ctx.save_for_backward(hidden, lse_pos, lse_neg)
        ctx.mark_non_differentiable(setup.positive_count, angle_stats)
        ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs' gradients
        return lsr, setup.positive_count, angle_stats

    @staticmethod
    def backward(ctx, grad_lsr, _grad_count, _grad_angles):
        hidden, lse_pos, lse_neg = ctx.saved_tensors
        plan, setup = ctx.plan, ctx.setup
        if grad_lsr is None:  # Lsr took no part in what is differentiated
            return None, None
        grad = _anchor_gradients(grad_lsr, lse_neg, torch.float32)
        if not grad.any() and plan.gather is None:  # lambda = 0: nothing to recompute
            return torch.zeros_like(hidden), None
        hidden, keys = _operands(hidden, plan)
        live = grad != 0  # other rows get shifts that make their exponentials 0
        stats = torch.stack([torch.where(live, lse_pos, MASKED), torch.where(live, lse_neg, MASKED), grad], -1)
        key_stats = stats if setup.symmetric else _all_gather_sequence(stats, plan.gather)
        grad_units = hidden.new_zeros((setup.segments, setup.length, hidden.shape[-1]), dtype=torch.float32)
        _backward_kernel[(setup.tiles, setup.segments)](
            hidden, keys, setup.scale, setup.key_scale, setup.labels, setup.key_labels,
            stats.float().contiguous(), key_stats.float().contiguous(), setup.tile_rows, setup.tile_cols, grad_units,
            *setup.shape_args(hidden, keys),
            SYMMETRIC=setup.symmetric, BLOCK=setup.block, BLOCK_K=BLOCK_K, PRECISION=_precision(hidden),
            DOT_DTYPE=tl.bfloat16 if hidden.dtype == torch.bfloat16 else tl.float32, num_warps=NUM_WARPS,
        )
        grad_hidden = torch.empty_like(hidden)
        b, s, h = hidden.shape
        _normalize_backward_kernel[(triton.cdiv(b * s, NORMALIZE_TOKENS),)](
            hidden, grad_units, setup.scale, setup.radial, grad_hidden, s, h, setup.length, setup.chunks, b * s,
            hidden.stride(0), hidden.stride(1), grad_hidden.stride(0), grad_hidden.stride(1),
            BLOCK_T=NORMALIZE_TOKENS, BLOCK_K=BLOCK_K,
        )
        return grad_hidden, None


def _precision(hidden: torch.Tensor) -> str | None:
    return DOT_PRECISION if hidden.dtype == torch.float32 else None  # half inputs: products are exact anyway


def _operands(hidden: torch.Tensor, plan):
    """The hidden states as the kernels read them (any layout with contiguous rows), and the keys' (gathered)."""
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton SimReg kernel takes fp32, bf16 or fp16 hidden states, got {hidden.dtype}")
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    return hidden, hidden if plan.gather is None else _all_gather_sequence(hidden, plan.gather)


class _Setup:
    """The kernels' per-token inputs (scales, label ranks, set sizes) and their tile list."""

    @classmethod
    def of(cls, hidden: torch.Tensor, keys: torch.Tensor, plan) -> "_Setup":
        self = cls()
        b = hidden.shape[0]
        self.length = plan.segment  # tokens per segment (the anchors' side)
        self.key_length = keys.shape[1] if plan.gather is not None else plan.segment
        self.chunks = plan.labels.shape[0] // b
        self.segments = plan.labels.shape[0]
        self.temperature = 1.0 / plan.inv_temperature
        self.symmetric = plan.gather is None
        self.block = max(16, min(BLOCK, triton.next_power_of_2(min(plan.block_size, plan.segment))))

        key_labels, key_valid = _pairing_partners(plan.labels, plan.valid, plan)
        key_ids = _kernel_labels(key_labels)
        anchor_ids = _local_share(key_ids, plan)
        self.positive_count, self.negative_count = _set_sizes(
            anchor_ids, key_ids, key_valid, plan.valid, torch.float32
        )
        self.labels = torch.where(plan.valid, anchor_ids, -1).to(torch.int32).contiguous()
        self.scale, self.radial = _scales(hidden, self.temperature, self.length)
        if self.symmetric:
            self.key_scale, self.key_labels = self.scale, self.labels
        else:
            self.key_scale = _scales(keys, self.temperature, self.key_length)[0]
            self.key_labels = torch.where(key_valid, key_ids, -1).to(torch.int32).contiguous()

        row_blocks = triton.cdiv(self.length, self.block)
        self.key_blocks = triton.cdiv(self.key_length, self.block)
        pairs = [(i, j) for i in range(row_blocks) for j in range(self.key_blocks) if not self.symmetric or j >= i]
        index = torch.tensor(pairs, dtype=torch.int32).T.contiguous().to(hidden.device)
        self.tile_rows, self.tile_cols = index[0], index[1]
        self.tiles = len(pairs)
        return self

    def shape_args(self, hidden: torch.Tensor, keys: torch.Tensor):
        return (
            hidden.shape[-1], self.length, self.key_length, self.chunks, hidden.shape[1], keys.shape[1],
            hidden.stride(0), hidden.stride(1), keys.stride(0), keys.stride(1),
        )


def _scales(hidden: torch.Tensor, temperature: float, segment: int):
    """Per token, batched into segments like the plan (the tail padded with 0): the scale of the unit vectors
    u = h * scale, scale = 1 / (max(|h|, eps) sqrt(tau)), and the radial factor of their backward, tau * scale^2
    (0 where |h| < eps, whose u = h / eps has no radial part)."""
    norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32)
    scale = (norms.clamp_min(NORM_EPS) * math.sqrt(temperature)).reciprocal_()
    radial = torch.where(norms < NORM_EPS, 0.0, temperature * scale * scale)
    return tuple(_batched(x, segment).contiguous() for x in (scale, radial))


@triton.jit
def _acos(x):
    """arccos on [-1, 1] to ~2e-8 rad: sqrt(1 - |x|) times a degree-7 polynomial (Hastings' approximation, as in
    Abramowitz & Stegun 4.4.46), mirrored for x < 0. Triton's language has no arccos of its own."""
    a = tl.abs(x)
    p = -0.0012624911
    p = p * a + 0.0066700901
    p = p * a - 0.0170881256
    p = p * a + 0.0308918810
    p = p * a - 0.0501743046
    p = p * a + 0.0889789874
    p = p * a - 0.2145988016
    p = p * a + 1.5707963050
    r = tl.sqrt(tl.maximum(1.0 - a, 0.0)) * p
    return tl.where(x < 0, 3.141592653589793 - r, r)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if _UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile(
    hidden, keys, scale, key_scale, labels, key_labels, t, seg,
    tile_rows, tile_cols, hidden_size, length, key_length, chunks, sequence, key_sequence,
    stride_b, stride_s, key_stride_b, key_stride_s,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One tile: logits z = cos / tau, the same-label and different-label masks of valid pairs, and where it is."""
    row_block = tl.load(tile_rows + t)
    col_block = tl.load(tile_cols + t)
    sample = (seg // chunks).to(tl.int64)
    start = (seg % chunks) * length  # the segment's first position in the sequence (0 when keys are gathered)
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    row_ok = (rows < length) & (start + rows < sequence)
    col_ok = (cols < key_length) & (start + cols < key_sequence)
    row_labels = tl.load(labels + seg * length + rows, mask=rows < length, other=-1)
    col_labels = tl.load(key_labels + seg * key_length + cols, mask=cols < key_length, other=-1)
    row_scale = tl.load(scale + seg * length + rows, mask=rows < length, other=0.0)
    col_scale = tl.load(key_scale + seg * key_length + cols, mask=cols < key_length, other=0.0)

    row_ptr = hidden + sample * stride_b + (start + rows).to(tl.int64)[:, None] * stride_s
    col_ptr = keys + sample * key_stride_b + (start + cols).to(tl.int64)[:, None] * key_stride_s
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        a = tl.load(row_ptr + ks[None, :], mask=row_ok[:, None] & (ks < hidden_size)[None, :], other=0.0)
        b = tl.load(col_ptr + ks[None, :], mask=col_ok[:, None] & (ks < hidden_size)[None, :], other=0.0)
        if _UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    z = acc * row_scale[:, None] * col_scale[None, :]

    valid = (row_labels >= 0)[:, None] & (col_labels >= 0)[None, :]
    equal = row_labels[:, None] == col_labels[None, :]
    return (z, valid & equal, valid & (~equal), row_block, col_block, rows, cols, row_ok, col_ok, row_scale, col_scale,
            sample, start)


@triton.jit
def _partials(z, same, different, AXIS: tl.constexpr):
    """Per row (AXIS 1) or column (AXIS 0) of the tile: (max, sum of exp(z - max)) over its positives and over its
    negatives, one exp per element (its own set's max as the shift)."""
    top_pos = tl.maximum(tl.max(tl.where(same, z, -_MASKED), AXIS), -_MASKED / 2)
    top_neg = tl.maximum(tl.max(tl.where(different, z, -_MASKED), AXIS), -_MASKED / 2)
    shift = tl.where(same, tl.expand_dims(top_pos, AXIS), tl.expand_dims(top_neg, AXIS))
    terms = tl.exp(tl.minimum(z - shift, 0.0))
    return top_pos, tl.sum(tl.where(same, terms, 0.0), AXIS), top_neg, tl.sum(tl.where(different, terms, 0.0), AXIS)


@triton.jit
def _store_partials(partials, at, parts, block, ok, top_pos, sum_pos, top_neg, sum_neg):
    where = (at * parts + block) * 4
    tl.store(partials + where, top_pos, mask=ok)
    tl.store(partials + where + 1, sum_pos, mask=ok)
    tl.store(partials + where + 2, top_neg, mask=ok)
    tl.store(partials + where + 3, sum_neg, mask=ok)


@triton.jit
def _forward_kernel(
    hidden, keys, scale, key_scale, labels, key_labels, tile_rows, tile_cols, partials, angles,
    hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
    parts, temperature,
    SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    seg = tl.program_id(1)
    z, same, different, row_block, col_block, rows, cols, row_ok, col_ok, _, _, _, _ = _tile(
        hidden, keys, scale, key_scale, labels, key_labels, t, seg, tile_rows, tile_cols,
        hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
        BLOCK, BLOCK_K, PRECISION,
    )
    radians = tl.sum(tl.sum(tl.where(different, _acos(tl.minimum(tl.maximum(z * temperature, -1.0), 1.0)), 0.0), 1), 0)
    mirrored = (col_block > row_block) & SYMMETRIC  # the tile also stands for its transpose
    tl.store(angles + seg * tl.num_programs(0) + t, tl.where(mirrored, 2.0, 1.0) * radians)

    top_pos, sum_pos, top_neg, sum_neg = _partials(z, same, different, 1)
    _store_partials(partials, seg * length + rows, parts, col_block, rows < length, top_pos, sum_pos, top_neg, sum_neg)
    if mirrored:  # its columns are anchors too
        top_pos, sum_pos, top_neg, sum_neg = _partials(z, same, different, 0)
        at = seg * length + cols
        _store_partials(partials, at, parts, row_block, cols < length, top_pos, sum_pos, top_neg, sum_neg)


@triton.jit
def _backward_kernel(
    hidden, keys, scale, key_scale, labels, key_labels, stats, key_stats, tile_rows, tile_cols, grad_units,
    hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
    SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    t = tl.program_id(0)
    seg = tl.program_id(1)
    z, same, different, row_block, col_block, rows, cols, row_ok, col_ok, row_scale, col_scale, sample, start = _tile(
        hidden, keys, scale, key_scale, labels, key_labels, t, seg, tile_rows, tile_cols,
        hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
        BLOCK, BLOCK_K, PRECISION,
    )
    # Per token: the positives' and negatives' log-sum-exps (MASKED where g = 0) and g = d loss / d Lsr.
    row_stats = stats + (seg * length + rows) * 3
    col_stats = key_stats + (seg * key_length + cols) * 3
    row_pos = tl.load(row_stats, mask=rows < length, other=_MASKED)
    row_neg = tl.load(row_stats + 1, mask=rows < length, other=_MASKED)
    row_grad = tl.load(row_stats + 2, mask=rows < length, other=0.0)
    col_pos = tl.load(col_stats, mask=cols < key_length, other=_MASKED)
    col_neg = tl.load(col_stats + 1, mask=cols < key_length, other=_MASKED)
    col_grad = tl.load(col_stats + 2, mask=cols < key_length, other=0.0)
    # W = G + G^T: G_ij = g_i (softmax over N_i at j, or minus the softmax over P_i at j).
    rows_w = row_grad[:, None] * tl.exp(tl.minimum(z - tl.where(same, row_pos[:, None], row_neg[:, None]), 0.0))
    cols_w = col_grad[None, :] * tl.exp(tl.minimum(z - tl.where(same, col_pos[None, :], col_neg[None, :]), 0.0))
    w = tl.where(different, rows_w + cols_w, tl.where(same, -(rows_w + cols_w), 0.0))

    # d loss / d u_I += W u_J and d loss / d u_J += W^T u_I, with u_j = h_j * scale_j and h as stored.
    w_rows = (w * col_scale[None, :]).to(DOT_DTYPE)
    w_cols = tl.trans(w * row_scale[:, None]).to(DOT_DTYPE)
    mirrored = (col_block > row_block) & SYMMETRIC
    row_ptr = hidden + sample * stride_b + (start + rows).to(tl.int64)[:, None] * stride_s
    col_ptr = keys + sample * key_stride_b + (start + cols).to(tl.int64)[:, None] * key_stride_s
    row_out = grad_units + (seg * length + rows).to(tl.int64)[:, None] * hidden_size
    col_out = grad_units + (seg * length + cols).to(tl.int64)[:, None] * hidden_size
    for k in range(0, hidden_size, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        in_k = (ks < hidden_size)[None, :]
        col_h = tl.load(col_ptr + ks[None, :], mask=col_ok[:, None] & in_k, other=0.0).to(DOT_DTYPE)
        tl.atomic_add(row_out + ks[None, :], _dot(w_rows, col_h, PRECISION), mask=row_ok[:, None] & in_k)
        if mirrored:
            row_h = tl.load(row_ptr + ks[None, :], mask=row_ok[:, None] & in_k, other=0.0).to(DOT_DTYPE)
            tl.atomic_add(col_out + ks[None, :], _dot(w_cols, row_h, PRECISION), mask=col_ok[:, None] & in_k)


@triton.jit
def _normalize_backward_kernel(
    hidden, grad_units, scale, radial, grad_hidden, sequence, hidden_size, length, chunks, tokens,
    stride_b, stride_s, out_stride_b, out_stride_s, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per token: d loss / d h = scale * (g - tau scale^2 (h . g) h) for u = h * scale (the radial factor is 0
    where |h| < eps); g = d loss / d u from the tiles, in the batched layout. BLOCK_T tokens per program."""
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = token < tokens
    sample = (token // sequence).to(tl.int64)
    position = token % sequence
    at = (sample * chunks + position // length) * length + position % length  # the batched row
    s = tl.load(scale + at, mask=ok, other=0.0)
    factor = tl.load(radial + at, mask=ok, other=0.0)
    h_ptr = hidden + (sample * stride_b + position.to(tl.int64) * stride_s)[:, None]
    g_ptr = grad_units + (at * hidden_size)[:, None]
    out_ptr = grad_hidden + (sample * out_stride_b + position.to(tl.int64) * out_stride_s)[:, None]
    dot = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        where = ok[:, None] & (ks < hidden_size)[None, :]
        h = tl.load(h_ptr + ks[None, :], mask=where, other=0.0).to(tl.float32)
        dot += h * tl.load(g_ptr + ks[None, :], mask=where, other=0.0)
    along = factor * tl.sum(dot, 1)
    for k in range(0, hidden_size, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        where = ok[:, None] & (ks < hidden_size)[None, :]
        h = tl.load(h_ptr + ks[None, :], mask=where, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + ks[None, :], mask=where, other=0.0)
        out = s[:, None] * (g - along[:, None] * h)
        tl.store(out_ptr + ks[None, :], out.to(grad_hidden.dtype.element_ty), mask=where)
