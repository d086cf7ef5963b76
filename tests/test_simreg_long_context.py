"""The Triton SimReg kernel at long contexts and in fp16: its launch arithmetic at s = 131,072 (computed, not run),
a run at s = 4,096 under Triton's interpreter against the PyTorch kernel, and fp16 against float64.

The interpreter pays about 1 ms of Python per operation of a program, so the run at s = 4,096 takes 256-wide
tiles, 1,024-token chunks and h = 16 (about 7 s of CPU); the kernels' arithmetic does not depend on the tile side.
"""

import math
from contextlib import contextmanager

import pytest
import test_simreg_triton
import torch
from simreg_reference import reference_loss, reference_terms
from test_simreg import clustered, random_mask
from test_simreg_triton import gradients, interpreted, logit_tolerance

from megatron_simreg.simreg import simreg_loss, simreg_terms

triton = pytest.importorskip("triton")
tl = triton.language
from megatron_simreg.simreg.triton_jit import _backward_operand  # noqa: E402 (needs triton)

interpreter = test_simreg_triton.interpreter  # the fixture: this module's own interpreter process

LONG = 131_072


def launch(b, s, h, chunk=None, gathered=1):
    """The launch of a call on `b` sequences of `s` tokens (each rank's share of `gathered` ranks when keys are
    gathered), as `triton._Setup.launch` builds it from the tensors."""
    from megatron_simreg.simreg import triton as simreg_triton
    from megatron_simreg.simreg.launch import Launch

    length = chunk or s
    return Launch(
        tokens=b * s, hidden_size=h, segments=b * (s // length), length=length, key_length=length * gathered,
        block=simreg_triton.BLOCK, block_k=simreg_triton.BLOCK_K, normalize_tokens=simreg_triton.NORMALIZE_TOKENS,
        symmetric=gathered == 1,
    )


@pytest.mark.parametrize("b, chunk, gathered", [
    (1, None, 1),  # one sequence of 131,072 tokens: 2,048 x 2,049 / 2 tiles
    (1, None, 8),  # its 16,384-token share on 8 ranks against the gathered 131,072 keys
    (4096, 1024, 1),  # b * chunks = 524,288 segments, past the 65,535 of a grid's y axis
    (1100, None, 1),  # 2.3e9 backward programs, past the 2^31 - 1 of a grid's x axis: folded onto y
])
def test_launch_fits_cuda_limits_at_long_context(b, chunk, gathered):
    """Every kernel's grid within CUDA's limits and covering its programs, every offset within its type, and the
    forward's partials linear in s (bounded splits per anchor, not s / 64 key blocks)."""
    from megatron_simreg.simreg.launch import MAX_GRID_X, MAX_GRID_Y

    s = LONG // gathered
    plan = launch(b, s, 8192, chunk, gathered)
    for kernel, programs in plan.programs.items():
        x, y = plan.grid(kernel)
        assert x <= MAX_GRID_X and y <= MAX_GRID_Y, kernel
        assert x * (y - 1) < programs <= x * y, kernel  # all covered, spare programs in the last row only
    # What stays int32 in the kernels: positions within a segment (a tile past its end included) or a hidden vector.
    assert max(plan.length, plan.key_length) + plan.block < 2**31 and plan.hidden_size + plan.block_k < 2**31
    assert plan.programs["forward"] >= 4096, "enough programs to fill a GPU"

    partial_bytes = math.prod(plan.partials_shape) * 4
    assert partial_bytes <= 16 * 16 * b * s  # 16 splits at most, (max, sum) twice, fp32
    doubled = launch(b, 2 * s, 8192, chunk, gathered)
    assert math.prod(doubled.partials_shape) <= 2 * math.prod(plan.partials_shape)


def test_long_contexts_need_int64_offsets_and_folded_grids():
    """Why the kernels take int64 offsets and fold their grids: two sequences of 131,072 tokens at h = 8,192 put the
    gradient of the units (fp32, one row a token) past int32, and a grid of segments on its own axis would pass y's
    limit; the old per-tile partials passed int32 at two such sequences too."""
    two = launch(2, LONG, 8192)
    assert two.tokens * two.hidden_size >= 2**31
    assert two.tokens * two.key_blocks * 4 >= 2**31 > math.prod(two.partials_shape)
    assert launch(4096, LONG, 8192, 1024).segments > 65_535
    assert launch(1100, LONG, 8192).grid("backward")[1] == 2


@contextmanager
def patched(module, **values):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def long_case():
    interpreted()
    from megatron_simreg.simreg import launch as simreg_launch
    from megatron_simreg.simreg import triton as simreg_triton

    hidden, labels = clustered(1, 4096, 16, labels=700, dtype=torch.float32)  # a third of the tokens lack positives
    mask = random_mask(1, 4096)

    def run(kernel):
        x = hidden.clone().requires_grad_()
        out = simreg_loss(x, labels, mask, 0.05, 1024, block_size=256, reduction="token", kernel=kernel)
        out.loss.backward()
        return out, x.grad

    # Each forward program walks 2 of its 4 key blocks; every grid folds onto y (7 programs a row), spares included.
    with patched(simreg_triton, BLOCK=256, NORMALIZE_TOKENS=256), patched(simreg_launch, KEY_SPLITS=2, MAX_GRID_X=7):
        fused, fused_grad = run("triton")
    tiled, tiled_grad = run("torch")
    tolerance = logit_tolerance(16, 0.05)  # relative: the loss and its gradient move with the logits' errors
    assert 1 < tiled.lsr_mean < 20  # of order one: the tolerance below is relative
    torch.testing.assert_close(fused.loss, tiled.loss, rtol=tolerance, atol=0)
    torch.testing.assert_close(fused.lsr_mean, tiled.lsr_mean, rtol=tolerance, atol=0)
    assert torch.equal(fused.live_fraction, tiled.live_fraction)
    torch.testing.assert_close(fused.negative_angle, tiled.negative_angle, rtol=1e-5, atol=0)  # 2e-8 rad arccos
    torch.testing.assert_close(fused_grad, tiled_grad, rtol=0, atol=tolerance * tiled_grad.abs().max().item())


def test_4096_tokens_match_torch(interpreter):
    """Chunks of 1,024 of a 4,096-token sequence (h = 16): Lsr, the loss and its gradient as the PyTorch kernel's,
    with forward programs walking several key blocks each and grids folded onto two axes."""
    interpreter(long_case)


def fp16_case():
    interpreted()
    hidden, labels = clustered(2, 37, 32, dtype=torch.float16)  # 3 x 3 tiles of 16, the last 5 tokens long
    mask = random_mask(2, 37)
    terms = simreg_terms(hidden, labels, mask, 0.01, block_size=16, kernel="triton")
    ref = reference_terms(hidden.double(), labels, mask, 0.01)
    finite = mask & torch.isfinite(ref)
    # fp16 x fp16 products are exact in the fp32 accumulator: only fp32's roundings remain.
    torch.testing.assert_close(terms[finite].double(), ref[finite], rtol=0, atol=logit_tolerance(32, 0.01))

    _, ref_grad = gradients(lambda y: reference_loss(y, labels, mask, 0.01), hidden.double())
    scale = ref_grad.abs().max().item()
    for deterministic in (False, True):
        x = hidden.clone().requires_grad_()
        simreg_loss(x, labels, mask, 0.01, block_size=16, kernel="triton", deterministic=deterministic).loss.backward()
        assert x.grad.dtype == torch.float16
        # W rounded to nearest TF32 (2^-11 relative), the result stored in fp16 (2^-11 relative).
        torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0, atol=4 * 2**-11 * scale)


def test_fp16_matches_float64(interpreter):
    """fp16 hidden states: Lsr and both backwards' gradients within fp16's rounding of the float64 SimReg of the same
    fp16 values."""
    interpreter(fp16_case)


@triton.jit
def _backward_operand_kernel(w, out, N: tl.constexpr, PRECISION: tl.constexpr):
    at = tl.arange(0, N)
    tl.store(out + at, _backward_operand(tl.load(w + at), tl.float32, PRECISION))


def tf32_case():
    interpreted()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, generator=gen) * torch.logspace(-30, 3, 4096)  # W's small weights, either sign
    ties = torch.tensor([1 + 2**-11, -(1 + 3 * 2**-11), 2**-40 * (1 + 2**-11)])  # half-way: away from 0, not even
    w[-4:] = torch.cat([ties, torch.zeros(1)])
    rounded = torch.empty_like(w)
    _backward_operand_kernel[(1,)](w, rounded, N=4096, PRECISION="tf32")

    mantissa, exponent = torch.frexp(w.double())  # |mantissa| in [0.5, 1): 11 significant bits kept, ties away
    expected = torch.ldexp(mantissa.sign() * torch.floor(mantissa.abs() * 2**11 + 0.5) / 2**11, exponent)
    assert torch.equal(rounded.double(), expected)
    assert (rounded != w).float().mean() > 0.99  # fp32 values, not TF32's already

    unchanged = torch.empty_like(w)
    _backward_operand_kernel[(1,)](w, unchanged, N=4096, PRECISION="tf32x3")  # splits fp32 itself: no rounding
    assert torch.equal(unchanged, w)


def test_fp16_backward_rounds_w_to_nearest_tf32(interpreter):
    """The TF32 tensor cores would truncate W's fp32 mantissa (a bias toward 0): the fp16 backward rounds it to
    nearest first, ties away from zero, as a float64 reference computes."""
    interpreter(tf32_case)
