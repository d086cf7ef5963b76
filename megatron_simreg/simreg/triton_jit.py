"""The Triton programs of SimReg's fused kernel: tiles, running partials, the two backwards and the normalisation's.

What they compute, and how `megatron_simreg.simreg.triton` launches them, is described there; here are the
programs alone, each taking plain pointers and sizes. Each finds its work from one flat program index in int64
(`_program`, the grid `launch.Launch.grid` folds), so every offset derived from it is int64 too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_simreg.simreg.base import MASKED

if not hasattr(triton, "knobs"):  # older images ship Triton 3.1 to 3.3
    raise ImportError(f"triton >= 3.4 needed (triton.knobs), found {triton.__version__}")

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""Whether these kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import): then on CPU tensors."""

_MASKED = tl.constexpr(MASKED)
_UPCAST = tl.constexpr(INTERPRETED)  # the interpreter multiplies bf16 as raw bits: hand it float32 (exact) instead


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
def _backward_operand(w, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """W as the backward's dot takes it, rounded to nearest: `.to(bf16)` rounds so, but TF32 tensor cores truncate
    fp32's mantissa (`tl.dot`'s warning: a bias toward 0), so for "tf32" W is rounded to TF32 here, by its bits."""
    if PRECISION == "tf32":
        bits = w.to(tl.int32, bitcast=True)
        return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return w.to(DOT_DTYPE)


@triton.jit
def _tile(
    hidden, keys, scale, key_scale, labels, key_labels, seg, row_block, col_block,
    hidden_size, length, key_length, chunks, sequence, key_sequence,
    stride_b, stride_s, key_stride_b, key_stride_s,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """The tile of anchors `row_block` and keys `col_block`: logits z = cos / tau, the same-label and different-label
    masks of valid pairs, and where it is."""
    sample = seg // chunks  # seg is int64 (`_program`), and all that derives from it
    start = (seg % chunks) * length  # the segment's first position in the sequence (0 when keys are gathered)
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    row_ok = (rows < length) & (start + rows < sequence)
    col_ok = (cols < key_length) & (start + cols < key_sequence)
    row_labels = tl.load(labels + seg * length + rows, mask=rows < length, other=-1)
    col_labels = tl.load(key_labels + seg * key_length + cols, mask=cols < key_length, other=-1)
    row_scale = tl.load(scale + seg * length + rows, mask=rows < length, other=0.0)
    col_scale = tl.load(key_scale + seg * key_length + cols, mask=cols < key_length, other=0.0)

    row_ptr = hidden + sample * stride_b + (start + rows)[:, None] * stride_s
    col_ptr = keys + sample * key_stride_b + (start + cols)[:, None] * key_stride_s
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
    return z, valid & equal, valid & (~equal), rows, cols, row_ok, col_ok, row_scale, col_scale, sample, start


@triton.jit
def _program(programs):
    """This program's index on the flat, segment-major axis `launch.Launch.grid` folds onto (x, y), in int64; -1
    past the end."""
    pid = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    return tl.where(pid < programs, pid, -1)


@triton.jit
def _running_sums(z, same, different, top_pos, sum_pos, top_neg, sum_neg):
    """Each row's running (max, sum of exp(z - max)) over its positives and over its negatives, extended by the
    tile: one exp per element (its own set's new max as the shift), the old sums rescaled to the new max."""
    new_pos = tl.maximum(top_pos, tl.max(tl.where(same, z, -_MASKED), 1))
    new_neg = tl.maximum(top_neg, tl.max(tl.where(different, z, -_MASKED), 1))
    terms = tl.exp(tl.minimum(z - tl.where(same, new_pos[:, None], new_neg[:, None]), 0.0))
    sum_pos = sum_pos * tl.exp(top_pos - new_pos) + tl.sum(tl.where(same, terms, 0.0), 1)
    sum_neg = sum_neg * tl.exp(top_neg - new_neg) + tl.sum(tl.where(different, terms, 0.0), 1)
    return new_pos, sum_pos, new_neg, sum_neg


@triton.jit
def _forward_kernel(
    hidden, keys, scale, key_scale, labels, key_labels, partials, angles,
    hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
    row_blocks, key_blocks, splits, programs, temperature,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Anchors `row_block` against key blocks `split`, `split + splits`, ... in order, each row's (max, sum) for
    positives and negatives kept running in registers and stored once, as FlashAttention's forward."""
    pid = _program(programs)
    if pid < 0:
        return
    seg = pid // (row_blocks * splits)
    row_block = ((pid // splits) % row_blocks).to(tl.int32)
    split = (pid % splits).to(tl.int32)
    floor = tl.full((BLOCK,), -_MASKED / 2, tl.float32)  # an empty set keeps a finite max
    top_pos, sum_pos, top_neg, sum_neg = floor, tl.zeros((BLOCK,), tl.float32), floor, tl.zeros((BLOCK,), tl.float32)
    radians = 0.0
    for col_block in range(split, key_blocks, splits):
        z, same, different, _, _, _, _, _, _, _, _ = _tile(
            hidden, keys, scale, key_scale, labels, key_labels, seg, row_block, col_block,
            hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b,
            key_stride_s, BLOCK, BLOCK_K, PRECISION,
        )
        radians += tl.sum(tl.sum(tl.where(different, _acos(tl.minimum(tl.maximum(z * temperature, -1.0), 1.0)), 0.0),
                                 1), 0)
        top_pos, sum_pos, top_neg, sum_neg = _running_sums(z, same, different, top_pos, sum_pos, top_neg, sum_neg)
    tl.store(angles + pid, radians)
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    where = ((seg * length + rows) * splits + split) * 4
    ok = rows < length
    tl.store(partials + where, top_pos, mask=ok)
    tl.store(partials + where + 1, sum_pos, mask=ok)
    tl.store(partials + where + 2, top_neg, mask=ok)
    tl.store(partials + where + 3, sum_neg, mask=ok)


@triton.jit
def _weights(z, same, different, stats, key_stats, seg, rows, cols, length, key_length):
    """W = G + G^T on the tile: G_ij = g_i (softmax over N_i at j, or minus the softmax over P_i at j), from the
    per-token positives' and negatives' log-sum-exps (MASKED where g = 0) and g = d loss / d Lsr."""
    row_stats = stats + (seg * length + rows) * 3
    col_stats = key_stats + (seg * key_length + cols) * 3
    row_pos = tl.load(row_stats, mask=rows < length, other=_MASKED)
    row_neg = tl.load(row_stats + 1, mask=rows < length, other=_MASKED)
    row_grad = tl.load(row_stats + 2, mask=rows < length, other=0.0)
    col_pos = tl.load(col_stats, mask=cols < key_length, other=_MASKED)
    col_neg = tl.load(col_stats + 1, mask=cols < key_length, other=_MASKED)
    col_grad = tl.load(col_stats + 2, mask=cols < key_length, other=0.0)
    rows_w = row_grad[:, None] * tl.exp(tl.minimum(z - tl.where(same, row_pos[:, None], row_neg[:, None]), 0.0))
    cols_w = col_grad[None, :] * tl.exp(tl.minimum(z - tl.where(same, col_pos[None, :], col_neg[None, :]), 0.0))
    return tl.where(different, rows_w + cols_w, tl.where(same, -(rows_w + cols_w), 0.0))


@triton.jit
def _backward_kernel(
    hidden, keys, scale, key_scale, labels, key_labels, stats, key_stats, tile_rows, tile_cols, grad_units,
    hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
    tiles, programs,
    SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid = _program(programs)
    if pid < 0:
        return
    seg = pid // tiles
    t = pid % tiles
    row_block = tl.load(tile_rows + t)
    col_block = tl.load(tile_cols + t)
    z, same, different, rows, cols, row_ok, col_ok, row_scale, col_scale, sample, start = _tile(
        hidden, keys, scale, key_scale, labels, key_labels, seg, row_block, col_block,
        hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
        BLOCK, BLOCK_K, PRECISION,
    )
    w = _weights(z, same, different, stats, key_stats, seg, rows, cols, length, key_length)

    # d loss / d u_I += W u_J and d loss / d u_J += W^T u_I, with u_j = h_j * scale_j and h as stored.
    w_rows = _backward_operand(w * col_scale[None, :], DOT_DTYPE, PRECISION)
    w_cols = _backward_operand(tl.trans(w * row_scale[:, None]), DOT_DTYPE, PRECISION)
    mirrored = (col_block > row_block) & SYMMETRIC
    row_ptr = hidden + sample * stride_b + (start + rows)[:, None] * stride_s
    col_ptr = keys + sample * key_stride_b + (start + cols)[:, None] * key_stride_s
    row_out = grad_units + (seg * length + rows)[:, None] * hidden_size
    col_out = grad_units + (seg * length + cols)[:, None] * hidden_size
    for k in range(0, hidden_size, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        in_k = (ks < hidden_size)[None, :]
        col_h = tl.load(col_ptr + ks[None, :], mask=col_ok[:, None] & in_k, other=0.0).to(DOT_DTYPE)
        tl.atomic_add(row_out + ks[None, :], _dot(w_rows, col_h, PRECISION), mask=row_ok[:, None] & in_k,
                      sem="relaxed")
        if mirrored:
            row_h = tl.load(row_ptr + ks[None, :], mask=row_ok[:, None] & in_k, other=0.0).to(DOT_DTYPE)
            tl.atomic_add(col_out + ks[None, :], _dot(w_cols, row_h, PRECISION), mask=col_ok[:, None] & in_k,
                          sem="relaxed")


@triton.jit
def _deterministic_backward_kernel(
    hidden, keys, scale, key_scale, labels, key_labels, stats, key_stats, grad_units,
    hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b, key_stride_s,
    row_blocks, key_blocks, programs,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """d loss / d u_I = sum over every key block J, in order, of W_IJ u_J: this program's rows alone, no atomics."""
    pid = _program(programs)
    if pid < 0:
        return
    seg = pid // row_blocks
    row_block = (pid % row_blocks).to(tl.int32)
    for col_block in range(0, key_blocks):
        z, same, different, rows, cols, row_ok, col_ok, _, col_scale, sample, start = _tile(
            hidden, keys, scale, key_scale, labels, key_labels, seg, row_block, col_block,
            hidden_size, length, key_length, chunks, sequence, key_sequence, stride_b, stride_s, key_stride_b,
            key_stride_s, BLOCK, BLOCK_K, PRECISION,
        )
        w = _weights(z, same, different, stats, key_stats, seg, rows, cols, length, key_length)
        w_rows = _backward_operand(w * col_scale[None, :], DOT_DTYPE, PRECISION)
        col_ptr = keys + sample * key_stride_b + (start + cols)[:, None] * key_stride_s
        row_out = grad_units + (seg * length + rows)[:, None] * hidden_size
        for k in range(0, hidden_size, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            in_k = (ks < hidden_size)[None, :]
            col_h = tl.load(col_ptr + ks[None, :], mask=col_ok[:, None] & in_k, other=0.0).to(DOT_DTYPE)
            out = row_out + ks[None, :]
            where = row_ok[:, None] & in_k
            tl.store(out, tl.load(out, mask=where, other=0.0) + _dot(w_rows, col_h, PRECISION), mask=where)


@triton.jit
def _normalize_backward_kernel(
    hidden, grad_units, scale, radial, grad_hidden, sequence, hidden_size, length, chunks, tokens, programs,
    stride_b, stride_s, out_stride_b, out_stride_s, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per token: d loss / d h = scale * (g - tau scale^2 (h . g) h) for u = h * scale (the radial factor is 0
    where |h| < eps); g = d loss / d u from the tiles, in the batched layout. BLOCK_T tokens per program."""
    pid = _program(programs)
    if pid < 0:
        return
    token = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = token < tokens
    sample = token // sequence
    position = token % sequence
    at = (sample * chunks + position // length) * length + position % length  # the batched row
    s = tl.load(scale + at, mask=ok, other=0.0)
    factor = tl.load(radial + at, mask=ok, other=0.0)
    h_ptr = hidden + (sample * stride_b + position * stride_s)[:, None]
    g_ptr = grad_units + (at * hidden_size)[:, None]
    out_ptr = grad_hidden + (sample * out_stride_b + position * out_stride_s)[:, None]
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
