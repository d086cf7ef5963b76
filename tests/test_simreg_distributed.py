"""SimReg under sequence and context parallelism (gloo, CPU) equals the single-process computation."""

import collections
import contextlib
from unittest import mock

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


COLLECTIVES = ("all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor", "broadcast",
               "all_to_all_single")


@contextlib.contextmanager
def counted_collectives():
    """Counts the calls of torch.distributed's collectives inside: `counts["all_reduce"]`, ..."""
    counts = collections.Counter()

    def counting(name, collective):
        def call(*args, **kwargs):
            counts[name] += 1
            return collective(*args, **kwargs)

        return mock.patch.object(dist, name, call)

    with contextlib.ExitStack() as patches:
        for name in COLLECTIVES:
            patches.enter_context(counting(name, getattr(dist, name)))
        yield counts


def collectives_worker(rank, world, hidden, labels, mask):
    """Full SimReg through the objective's call (Megatron's sequence parallelism: this rank's contiguous slice) at
    lambda 1 and 0, and with the gathered keys gathered again in backward: the collectives of forward and
    backward, and the gradient reaching this rank's hidden states."""
    from megatron_simreg import objective as objective_module
    from megatron_simreg.simreg import exchange

    size = S // world
    local = hidden[:, rank * size : (rank + 1) * size].transpose(0, 1).contiguous()
    sp_slice = (dist.group.WORLD, "contiguous", rank)
    sharding = mock.patch.object(objective_module, "_sequence_sharding", lambda _: sp_slice)
    results = {}
    for name, weight, keep_up_to in (("kept", 1.0, exchange.KEEP_GATHERED_KEYS_UP_TO), ("gathered again", 1.0, 1),
                                     ("lambda 0", 0.0, exchange.KEEP_GATHERED_KEYS_UP_TO)):
        objective = objective_module.SimRegObjective(weight=weight, temperature=TEMPERATURE, kernel="torch")
        x = local.clone().requires_grad_()
        with sharding, mock.patch.object(exchange, "KEEP_GATHERED_KEYS_UP_TO", keep_up_to):
            with counted_collectives() as forward:
                out = objective.simreg(x, labels, mask, sequence_parallel=True)
            with counted_collectives() as backward:
                (x.square().sum() + weight * out.loss).backward()
        results[name] = dict(forward=dict(forward), backward=dict(backward), grad=x.grad.transpose(0, 1),
                             loss=out.loss.detach())
    return results


def test_full_simreg_collectives_per_micro_batch():
    """Forward: one gather of labels and validity together, one of the hidden states, one all-reduce of the
    loss's sums; backward: one gather of the keys' weights, reusing forward's gathered hidden states (a second
    gather only for groups beyond KEEP_GATHERED_KEYS_UP_TO); at lambda 0 no backward collective at all. The
    gradients equal one process's in each case."""
    world = 2
    hidden, labels = clustered(2, S, 8, labels=4, seed=5)
    mask = random_mask(2, S, keep=0.85, seed=5)
    per_rank = run_distributed(collectives_worker, world, hidden, labels, mask)
    x = hidden.clone().requires_grad_()
    single = simreg_loss(x, labels, mask, TEMPERATURE)
    (x.square().sum() + single.loss).backward()
    forward = {"all_gather_into_tensor": 2, "all_reduce": 1}
    expected = {"kept": (forward, {"all_gather_into_tensor": 1}),
                "gathered again": (forward, {"all_gather_into_tensor": 2}),
                "lambda 0": (forward, {})}
    for name, (forward_counts, backward_counts) in expected.items():
        for rank_result in per_rank:
            counts = rank_result[name]["forward"], rank_result[name]["backward"]
            assert counts == (forward_counts, backward_counts), name
            torch.testing.assert_close(rank_result[name]["loss"], single.loss.detach(), rtol=1e-12, atol=1e-14)
        grad = torch.cat([rank_result[name]["grad"] for rank_result in per_rank], dim=1)
        if name == "lambda 0":  # SimReg adds nothing, not even zeros: the other term's gradient, bit for bit
            assert torch.equal(grad, 2 * hidden), name
        else:  # float64: ranks add their partial sums in another order than one process (see above)
            torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-14, msg=name)
