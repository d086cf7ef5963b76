"""megatron-core's DDP and optimizers on CPU (enabled by cpu_compat): the distributed optimizer over gloo,
in fp32 and with bf16 mixed precision, trains like the plain optimizer.

Layout equality of the model itself (TP, TP+SP, PP, DP, EP) is in test_parallel_training.py.
"""

import pytest
import torch
from distributed import run_distributed

from megatron_simreg.config import load_config

STEPS, BATCH, SEQ = 3, 4, 32
# The first step starts from the same weights: the same forward and backward on each rank, so the loss is
# identical and the gradient norms differ only by fp32 summation order (the all-reduced gradient against the
# reduce-scattered shards' norms summed): a few ulps, 1e-5 relative bounds that with room.
FIRST_STEP_NORM_REL = 1e-5
# After a step the master weights differ in their last fp32 bits (that summation order reaches the clipping
# coefficient). fp32: the next losses and norms move by the same few ulps. bf16: the bf16 weights are roundings
# of those master weights, and an entry may round to the neighbouring bf16 value (one ulp, 2^-7 = 7.8e-3 relative
# at most); the next steps' losses and norms are smooth functions of the weights, so they move by at most that
# relative amount too, whatever the CPU's bf16 kernels (AVX-512 bf16 or fp32 emulation).
LATER_STEP_REL = {"fp32": 1e-5, "bf16": 2**-7}
# Parameters after three steps. fp32: the same last-bit differences, Adam-scaled. bf16: a flipped rounding is one
# bf16 step (2.4e-4 at the weights' scale of 0.02-0.06; 2 bf16 ulps relative, 1.6e-2) and the next steps see it.
TOLERANCE = {"fp32": dict(rtol=1e-6, atol=1e-6), "bf16": dict(rtol=1.6e-2, atol=2.5e-4)}


def train_steps(rank, world, distributed_optimizer, precision):
    """A few AdamW steps on one fixed global batch, split over the data-parallel ranks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_simreg import parallel
    from megatron_simreg.model import model_provider

    cfg = load_config("configs/tiny-llama.yaml", [
        f"model.seq_length={SEQ}", f"training.precision={precision}", f"training.global_batch_size={BATCH}",
        "training.micro_batch_size=1", f"parallel.distributed_optimizer={str(distributed_optimizer).lower()}",
    ])
    parallel.initialize(cfg)  # seeds every rank alike: the same initial weights in every layout
    try:
        model = model_provider(cfg)
        ddp = DistributedDataParallel(
            model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
            model,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, bf16=precision == "bf16",
                            use_distributed_optimizer=distributed_optimizer),
            [ddp],
        )
        tokens = torch.randint(0, 100, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0)).chunk(world)[rank]
        positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
        history = []
        for _ in range(STEPS):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            loss = ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
            loss.backward()
            ddp.finish_grad_sync()  # DDP averages over ranks; equal token counts make it the global mean
            _, grad_norm, _ = optimizer.step()
            history.append((loss.item(), grad_norm))
        return history, {name: param.detach().clone() for name, param in model.named_parameters()}
    finally:
        parallel.destroy()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distributed_optimizer_matches_the_plain_optimizer(precision):
    """Sharded optimizer state (reduce-scatter of grads, all-gather of params over gloo) = replicated state.

    Compared on the same two ranks: against one process, Adam magnifies the last-bit differences of
    summing the batch in halves (up to 2e-5 in fp32 after three steps, whichever optimizer).
    """
    plain = run_distributed(train_steps, 2, False, precision)
    sharded = run_distributed(train_steps, 2, True, precision)
    for (want_history, want_params), (history, params) in zip(plain, sharded):
        (want_loss, want_norm), (loss, norm) = want_history[0], history[0]
        assert loss == want_loss and norm == pytest.approx(want_norm, rel=FIRST_STEP_NORM_REL)
        for (want_loss, want_norm), (loss, norm) in zip(want_history[1:], history[1:]):
            rel = LATER_STEP_REL[precision]
            assert loss == pytest.approx(want_loss, rel=rel) and norm == pytest.approx(want_norm, rel=rel)
        assert want_history[-1][0] < want_history[0][0] - 0.1, "the steps should train"
        for name, want in want_params.items():
            assert params[name].dtype == want.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
            torch.testing.assert_close(params[name], want, msg=name, **TOLERANCE[precision])
    for name, param in sharded[0][1].items():
        assert torch.equal(param, sharded[1][1][name]), f"{name}: ranks disagree after the all-gather"
