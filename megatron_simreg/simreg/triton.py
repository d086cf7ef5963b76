"""SimReg's pairwise kernel fused in Triton, for CUDA tensors (written by hand: no library fuses this loss).

Same contract as the PyTorch kernel in `tiles` (`_SimRegFunction`, the CPU path and the
reference this one is tested against): Lsr per token, |P_i|, the angle statistic, and in backward the
gradient of the hidden states in their own layout and dtype. Nothing `s x s` is ever in memory.

Forward: one program per (block of anchors, split, segment) walks the key blocks `split`, `split + splits`, ...
(at most `launch.KEY_SPLITS` splits, enough programs to fill a GPU) in order, as FlashAttention's forward. For
each it computes the tile z = cos / tau from the hidden states in their own dtype (bf16 from Megatron, the
sequence-first layout read in place through strides; products accumulate in fp32 over the hidden size in
`BLOCK_K` slices) and its masks from the labels and validity, and extends each row's running (max, sum of
exp(z - max)) for the positives and for the negatives, one exp per element (the shift is the row's running
maximum over the element's set). It stores them once: partials `[segments, length, splits, 4]`, linear in s,
combined per token afterwards by a few small PyTorch ops. A symmetric plan's forward so computes each
off-diagonal tile from both sides, twice the triangle's products: the mirrored columns' partials would take
one per tile, s^2 / BLOCK per sequence, quadratic in s. The backward keeps the triangle.

Backward: one program per (tile pair, segment) recomputes the tile, forms W = G + G^T (G_ij = g_i dLsr_i/dz_ij,
from the saved log-sum-exps) and adds W u_J into the anchors' and W^T u_I into the keys' fp32 gradient
(atomically: every block of rows gets contributions from many tiles, and with h up to 8192 the
accumulators cannot stay on chip), then a row kernel applies the normalisation's backward and writes the
gradient in the input's layout and dtype. The atomics are relaxed: each only adds, nothing is read back before
the kernel ends, so the default acq_rel ordering (a fence per element) buys nothing. Like FlashAttention's dq
accumulation, the atomic order makes the last bits of the gradient vary from run to run.

The deterministic backward (`plan.deterministic`: `simreg.deterministic: true`, or torch's deterministic
algorithms, which Megatron's --deterministic-mode turns on) has no atomics, as FlashAttention-2's deterministic
mode: one program per (block of anchors, segment) walks every key block in order, recomputing each tile (also
the mirrored ones, so about twice the tile work of the atomic backward), and adds W u_J into rows that no other
program writes. The same inputs then give the same bits whatever order the programs run in.

Launch: `launch.Launch` computes every grid, program count and buffer size from the shapes alone; each kernel
numbers its programs on one flat int64 axis folded onto CUDA's grid (x < 2^31, y <= 65,535), so s = 131,072
and hundreds of thousands of segments fit, and offsets past 2^31 elements stay exact (int64).

Full SimReg under sequence/context parallelism (a gathered key sequence) runs the same kernels unmirrored:
local anchor rows against all gathered keys, as the PyTorch path does.

The tiling with running (max, sum) per row and recomputation in backward follows FlashAttention and
Inf-CL's tile-wise contrastive loss; unlike attention (head size 128), SimReg's "head" is the whole hidden
size, so the gradient accumulators live in global memory rather than in registers.

Precision of the products, against the float64 SimReg (tau = 0.01, anisotropic embeddings, relative errors
of the loss / of the gradient's norm; `python -m megatron_simreg.bench.simreg_precision`, which emulates the
roundings on any machine and runs the kernels themselves on a GPU):

    bf16 input, bf16 x bf16 products, fp32 accumulation:  loss exact up to fp32 sums; W rounded to bf16 in
        backward: gradient 1.5e-4 to 1.6e-4 (W in TF32 would give 2e-5), below the 2^-9 ~ 2e-3 rounding of
        the bf16 gradient it becomes, so the bf16 tensor-core product is kept.
    fp16 input, fp16 x fp16 products (exact in fp32), fp32 accumulation: loss exact up to fp32 sums; W rounded
        to nearest TF32 in backward (fp16 would flush its small weights) against the fp16 hidden states, which
        TF32 holds exactly: gradient 1.9e-5 to 2.1e-5, below the 2^-11 ~ 5e-4 rounding of the fp16 gradient it
        becomes. Left to the tensor cores, which truncate an fp32 operand, W would give 3.5e-4 (a bias).
    fp32 input, TF32 products: loss 6e-6 to 1.8e-5, gradient 5.3e-4 to 6.0e-4: too coarse for an fp32 run;
        "tf32x3" (three TF32 products, fp32-level: 1e-9 / 7e-8) is the default, `DOT_PRECISION`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from megatron_simreg.simreg.base import MASKED, NORM_EPS, _anchor_gradients, _combine, _lsr, _set_sizes
from megatron_simreg.simreg.exchange import _all_gather_sequence, _kept_keys, _keys, _local_share, _pairing_partners
from megatron_simreg.simreg.launch import Launch
from megatron_simreg.simreg.plan import _batched, _kernel_labels
from megatron_simreg.simreg.triton_jit import (
    INTERPRETED,
    _backward_kernel,
    _deterministic_backward_kernel,
    _forward_kernel,
    _normalize_backward_kernel,
)

BLOCK = 64
"""Tile side on a GPU (rows and columns). `block_size` below 64 picks a smaller power of two (>= 16)."""
BLOCK_K = 64
"""Slice of the hidden size per product step."""
NUM_WARPS = 8
"""Warps per tile program: with 4, a 64 x 64 tile's fp32 state spills registers (checked by compiling for sm_90)."""
NORMALIZE_TOKENS = 16
"""Tokens per program of the normalisation's backward."""
DOT_PRECISION = "tf32x3"
"""How fp32 inputs (and the fp32 W of their backward) enter the tensor cores (see the module docstring). bf16 and
fp16 inputs are multiplied as they are, exactly, accumulating in fp32; in backward W is rounded to nearest bf16
for bf16 inputs, and to nearest TF32 for fp16 ones (`FP16_W_PRECISION`)."""
FP16_W_PRECISION = "tf32"
"""fp16 inputs' backward, like bf16's: W rounded to nearest TF32 (`triton_jit._backward_operand`; fp16's own range
would flush W's small weights to 0) times the fp16 hidden states, which TF32 holds exactly, on the tensor cores
(errors in the module docstring)."""


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
        launch = setup.launch
        partials = hidden.new_empty(launch.partials_shape, dtype=torch.float32)
        angles = hidden.new_empty(launch.programs["forward"], dtype=torch.float32)
        _forward_kernel[launch.grid("forward")](
            hidden, keys, setup.scale, setup.key_scale, setup.labels, setup.key_labels, partials, angles,
            *setup.shape_args(hidden, keys), launch.row_blocks, launch.key_blocks, launch.splits,
            launch.programs["forward"], setup.temperature,
            BLOCK=setup.block, BLOCK_K=BLOCK_K, PRECISION=_precision(hidden.dtype), num_warps=NUM_WARPS,
        )
        lse_pos = _combine(partials[..., 0], partials[..., 1])
        lsr, lse_neg = _lsr(lse_pos, _combine(partials[..., 2], partials[..., 3]), setup.negative_count)
        negative_pairs = setup.negative_count.sum(dtype=torch.float64)
        angle_stats = torch.stack([angles.sum(dtype=torch.float64) * (180.0 / math.pi), negative_pairs])
        ctx.plan, ctx.setup = plan, setup  # per-token values only
        ctx.save_for_backward(hidden, lse_pos, lse_neg, _kept_keys(keys, plan))
        ctx.mark_non_differentiable(setup.positive_count, angle_stats)
        ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs' gradients
        return lsr, setup.positive_count, angle_stats

    @staticmethod
    def backward(ctx, grad_lsr, _grad_count, _grad_angles):
        hidden, lse_pos, lse_neg, kept = ctx.saved_tensors
        plan, setup = ctx.plan, ctx.setup
        if grad_lsr is None:  # Lsr took no part in what is differentiated
            return None, None
        # No shortcut for a zero gradient: knowing one would read it back from the GPU. A caller that trains
        # SimReg at weight 0 passes detached hidden states (as the objective does), and no backward runs.
        grad = _anchor_gradients(grad_lsr, lse_neg, torch.float32)
        hidden, keys = _operands(hidden, plan, kept)
        live = grad != 0  # other rows get shifts that make their exponentials 0
        stats = torch.stack([torch.where(live, lse_pos, MASKED), torch.where(live, lse_neg, MASKED), grad], -1)
        key_stats = stats if setup.symmetric else _all_gather_sequence(stats, plan.gather)
        grad_units = hidden.new_zeros((setup.segments, setup.length, hidden.shape[-1]), dtype=torch.float32)
        tokens = (hidden, keys, setup.scale, setup.key_scale, setup.labels, setup.key_labels,
                  stats.float().contiguous(), key_stats.float().contiguous())
        launch = setup.launch
        dot_dtype, precision = _backward_products(hidden.dtype)
        constants = dict(BLOCK=setup.block, BLOCK_K=BLOCK_K, PRECISION=precision, DOT_DTYPE=dot_dtype,
                         num_warps=NUM_WARPS)
        if plan.deterministic:
            _deterministic_backward_kernel[launch.grid("deterministic_backward")](
                *tokens, grad_units, *setup.shape_args(hidden, keys), launch.row_blocks, launch.key_blocks,
                launch.programs["deterministic_backward"], **constants,
            )
        else:
            _backward_kernel[launch.grid("backward")](
                *tokens, setup.tile_rows, setup.tile_cols, grad_units, *setup.shape_args(hidden, keys), launch.tiles,
                launch.programs["backward"], SYMMETRIC=setup.symmetric, **constants,
            )
        grad_hidden = torch.empty_like(hidden)
        b, s, h = hidden.shape
        _normalize_backward_kernel[launch.grid("normalize_backward")](
            hidden, grad_units, setup.scale, setup.radial, grad_hidden, s, h, setup.length, setup.chunks, b * s,
            launch.programs["normalize_backward"], hidden.stride(0), hidden.stride(1), grad_hidden.stride(0),
            grad_hidden.stride(1), BLOCK_T=NORMALIZE_TOKENS, BLOCK_K=BLOCK_K,
        )
        return grad_hidden, None


def _precision(dtype: torch.dtype) -> str | None:
    """The forward's: half inputs' products are exact in fp32 whatever the setting."""
    return DOT_PRECISION if dtype == torch.float32 else None


def _backward_products(dtype: torch.dtype):
    """The backward's W u products: (the type both factors enter the dot in, the dot's precision)."""
    if dtype == torch.bfloat16:
        return tl.bfloat16, None
    return tl.float32, FP16_W_PRECISION if dtype == torch.float16 else DOT_PRECISION


def _operands(hidden: torch.Tensor, plan, kept: torch.Tensor | None = None):
    """The hidden states as the kernels read them (any layout with contiguous rows), and the keys' (`_keys`)."""
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton SimReg kernel takes fp32, bf16 or fp16 hidden states, got {hidden.dtype}")
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    return hidden, _keys(hidden, plan, kept)


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

        self.launch = Launch(
            hidden.shape[0] * hidden.shape[1], hidden.shape[-1], self.segments, self.length, self.key_length,
            self.block, BLOCK_K, NORMALIZE_TOKENS, self.symmetric,
        )
        index = _tile_index(self.launch.row_blocks, self.launch.key_blocks, self.symmetric, hidden.device)
        self.tile_rows, self.tile_cols = index[0], index[1]
        return self

    def shape_args(self, hidden: torch.Tensor, keys: torch.Tensor):
        return (
            hidden.shape[-1], self.length, self.key_length, self.chunks, hidden.shape[1], keys.shape[1],
            hidden.stride(0), hidden.stride(1), keys.stride(0), keys.stride(1),
        )


@functools.lru_cache(maxsize=64)
def _tile_index(row_blocks: int, key_blocks: int, symmetric: bool, device: torch.device) -> torch.Tensor:
    """The (row block, key block) of each tile program, `[2, tiles]` int32 in row-major order: every pair once in
    a symmetric plan (key block >= row block), all pairs otherwise. Made on the device once per shape and kept,
    so no call copies an index from the host (a copy that would wait for the GPU's queue)."""
    return torch.triu_indices(row_blocks, key_blocks, 0 if symmetric else -row_blocks, dtype=torch.int32, device=device)


def _scales(hidden: torch.Tensor, temperature: float, segment: int):
    """Per token, batched into segments like the plan (the tail padded with 0): the scale of the unit vectors
    u = h * scale, scale = 1 / (max(|h|, eps) sqrt(tau)), and the radial factor of their backward, tau * scale^2
    (0 where |h| < eps, whose u = h / eps has no radial part)."""
    norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32)
    scale = (norms.clamp_min(NORM_EPS) * math.sqrt(temperature)).reciprocal_()
    radial = torch.where(norms < NORM_EPS, 0.0, temperature * scale * scale)
    return tuple(_batched(x, segment).contiguous() for x in (scale, radial))
