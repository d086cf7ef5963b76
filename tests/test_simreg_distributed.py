"""SimReg under sequence and context parallelism (gloo, CPU) equals the single-process computation."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from test_simreg import WHOLE, clustered, random_mask

from megatron_simreg.simreg import simreg_loss, simreg_terms

S = 24
TEMPERATURE = 0.05
# (name, chunk_size as every rank passes it, layout, single-process chunk_size giving the same result)
CASES = [
    ("full", None, "contiguous", lambda world: None),
    ("full zigzag", None, "zigzag", lambda world: None),
    ("chunk = local slice", "local", "contiguous", lambda world: S // world),
    ("chunk = local halves (zigzag)", "local", "zigzag", lambda world: S // (2 * world)),
    ("chunk < local slice", S // 12, "contiguous", lambda world: S // 12),
]
BLOCK_SIZES = (5, WHOLE)  # chunk-wise: the tiles, and the whole-matrix kernel (full SimReg gathers: tiles always)


def local_positions(layout, rank, world):
    """The sequence positions a rank holds: Megatron's SP slice or CP's two zigzag chunks."""
    if layout == "contiguous":
        size = S // world
        return torch.arange(rank * size, (rank + 1) * size)
    size = S // (2 * world)
    first, second = rank, 2 * world - 1 - rank
    return torch.cat([torch.arange(first * size, (first + 1) * size), torch.arange(second * size, (second + 1) * size)])


def sequence_parallel_worker(rank, world, hidden, labels, mask):
    results = {}
    for (name, chunk_size, layout, _), block_size in ((case, block) for case in CASES for block in BLOCK_SIZES):
        positions = local_positions(layout, rank, world)
        local = hidden[:, positions].transpose(0, 1).contiguous().requires_grad_()  # [s/world, b, h]
        kwargs = dict(
            temperature=TEMPERATURE,
            chunk_size=chunk_size,
            sequence_first=True,
            process_group=dist.group.WORLD,
            sequence_layout=layout,
            block_size=block_size,
        )
        out = simreg_loss(local, labels[:, positions], mask[:, positions], **kwargs)
        out.loss.backward()
        terms = simreg_terms(local.detach(), labels[:, positions], mask[:, positions], **kwargs)
        results[name, block_size] = dict(
            positions=positions,
            loss=out.loss.detach(),
            grad=local.grad.transpose(0, 1),
            terms=terms,
            stats=(out.lsr_mean, out.live_fraction, out.negative_angle, out.tokens),
        )
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_and_context_parallel_equal_single_process(world):
    hidden, labels = clustered(2, S, 8, labels=4, seed=world)
    mask = random_mask(2, S, keep=0.85, seed=world)
    per_rank = run_distributed(sequence_parallel_worker, world, hidden, labels, mask)
    for (case, _, _, single_chunk), block_size in ((case, block) for case in CASES for block in BLOCK_SIZES):
        name = f"{case}, block {block_size}"
        x = hidden.clone().requires_grad_()
        single = simreg_loss(x, labels, mask, TEMPERATURE, single_chunk(world))
        single.loss.backward()
        single_terms = simreg_terms(hidden, labels, mask, TEMPERATURE, single_chunk(world))
        grad = torch.zeros_like(hidden)
        terms = torch.zeros(2, S, dtype=hidden.dtype)
        # float64 throughout: ranks add their partial sums in another order than one process, ~1e-16 relative per
        # addition; the angle statistic sums acos values over many pairs (1e-9), gradients many exp-weighted terms.
        for rank_result in per_rank:
            got = rank_result[case, block_size]
            torch.testing.assert_close(got["loss"], single.loss.detach(), rtol=1e-12, atol=1e-14, msg=name)
            expected_stats = (single.lsr_mean, single.live_fraction, single.negative_angle, single.tokens)
            for value, expected in zip(got["stats"], expected_stats):
                torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12, msg=name)
            grad[:, got["positions"]] = got["grad"]
            terms[:, got["positions"]] = got["terms"]
        torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-14, msg=name)
        torch.testing.assert_close(terms[mask], single_terms[mask], rtol=1e-10, atol=1e-12, msg=name)
        assert single.loss > 1e-3, "the data should give a loss of order one"


def chunk_straddling_ranks_worker(rank, world):
    hidden, labels = clustered(1, 8, 4)
    with pytest.raises(ValueError, match="straddle"):
        simreg_loss(
            hidden[:, :4], labels[:, :4], chunk_size=3, process_group=dist.group.WORLD, sequence_layout="zigzag"
        )
    return True


def test_chunk_that_straddles_ranks_is_refused():
    assert all(run_distributed(chunk_straddling_ranks_worker, 2))
