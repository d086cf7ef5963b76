"""megatron-core's DDP and optimizers on CPU (enabled by cpu_compat): the distributed optimizer over gloo,
in fp32 and with bf16 mixed precision, trains like the plain optimizer.

Layout equality of the model itself (TP, TP+SP, PP, DP, EP) is in test_parallel_training.py.
"""

import pytest
import torch
from distributed import run_distributed

from megatron_simreg.config import load_config

STEPS, BATCH, SEQ, LR = 3, 4, 32, 1e-2
# The first step starts from the same weights: the same forward and backward on each rank, so the loss is
# identical and the gradient norms differ only by fp32 summation order (the all-reduced gradient against the
# reduce-scattered shards' norms summed): a few ulps, 1e-5 relative bounds that with room.
FIRST_STEP_NORM_REL = 1e-5
# After a step the fp32 master weights differ in their last bits (that summation order reaches the clipping
# coefficient). fp32: the next losses and norms move by the same few ulps, and Adam turns last-bit gradient
# differences into last-bit weight differences (rtol/atol 1e-6). bf16: the bf16 weights are roundings of those
# master weights, and an entry may round to the neighbouring bf16 value (2^-8 relative). The next losses and
# gradient norms are sums over millions of products of those weights: a share of flipped entries moves them by
# far less than one flip's 2^-8, so one bf16 ulp (2^-7 relative) bounds them on every CPU's kernels.
LATER_STEP_REL = {"fp32": 1e-5, "bf16": 2**-7}
FP32_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
# bf16 parameters after three steps: no elementwise bound holds, since Adam's early steps are close to
# lr * sign(gradient) (step 1 exactly), so a flipped rounding in step 1 that flips a small gradient's sign in step 2
# moves that entry by up to 2 lr per later step (4 lr over steps 2-3), whatever its size. What is bounded is the
# share of such entries. Every entry moved by about lr per step, so a tensor's change from its initial value has a
# norm near STEPS * lr * sqrt(n); the difference between the two optimizers, 4 lr * sqrt(flipped entries) at most
# plus bf16 half-ulps. Allowing 5% of the change (0.05 * 3 lr * sqrt(n)) admits up to 0.14% of the entries
# sign-flipped in both later steps, plus one such entry in any tensor (4 lr: a 64-entry norm weight has less than
# one 0.14%). A broken sharded optimizer (a shard not updated, updated twice, or with another shard's gradient)
# leaves half a tensor's entries ~lr apart or more: a ratio above 0.3.
BF16_CHANGE_SHARE = 0.05
BF16_ONE_FLIPPED_ENTRY = 4 * LR


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
            OptimizerConfig(optimizer="adam", lr=LR, clip_grad=1.0, bf16=precision == "bf16",
                            use_distributed_optimizer=distributed_optimizer),
            [ddp],
        )
        tokens = torch.randint(0, 100, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0)).chunk(world)[rank]
        positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
        initial = {name: param.detach().clone() for name, param in model.named_parameters()}
        history = []
        for _ in range(STEPS):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            loss = ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
            loss.backward()
            ddp.finish_grad_sync()  # DDP averages over ranks; equal token counts make it the global mean
            _, grad_norm, _ = optimizer.step()
            history.append((loss.item(), grad_norm))
        return history, initial, {name: param.detach().clone() for name, param in model.named_parameters()}
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
    for (want_history, initial, want_params), (history, _, params) in zip(plain, sharded):
        (want_loss, want_norm), (loss, norm) = want_history[0], history[0]
        assert loss == want_loss and norm == pytest.approx(want_norm, rel=FIRST_STEP_NORM_REL)
        for (want_loss, want_norm), (loss, norm) in zip(want_history[1:], history[1:]):
            rel = LATER_STEP_REL[precision]
            assert loss == pytest.approx(want_loss, rel=rel) and norm == pytest.approx(want_norm, rel=rel)
        assert want_history[-1][0] < want_history[0][0] - 0.1, "the steps should train"
        for name, want in want_params.items():
            assert params[name].dtype == want.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
            if precision == "fp32":
                torch.testing.assert_close(params[name], want, msg=name, **FP32_TOLERANCE)
                continue
            difference = (params[name].double() - want.double()).norm().item()
            change = (want.double() - initial[name].double()).norm().item()
            assert difference <= BF16_CHANGE_SHARE * change + BF16_ONE_FLIPPED_ENTRY, (name, difference, change)
    for name, param in sharded[0][2].items():
        assert torch.equal(param, sharded[1][2][name]), f"{name}: ranks disagree after the all-gather"
