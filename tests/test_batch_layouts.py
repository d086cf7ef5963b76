"""The objective does not depend on how a global batch is cut: micro-batch size, gradient accumulation,
data-parallel size and tensor + sequence parallelism all give the same training step (Megatron's contract).

One global batch of 8 packed sequences (all tokens valid, as our datasets give) through one optimizer step
of the tiny LLaMA, fp32, in four layouts, for both SimReg reductions and for full and chunk-wise SimReg.
"""

import pytest
import torch
from distributed import run_distributed
from layout_steps import LOSS_REL, forward_backward, gathered, gathered_grads, merged, model_with_shared_weights

from megatron_simreg.config import load_config

GLOBAL_BATCH = [
    "model.seq_length=32", "model.num_layers=2", "training.global_batch_size=8", "schedule.train_iters=10",
    "schedule.warmup_steps=2", "simreg.temperature=0.1", "simreg.block_size=8", "simreg.weight=2.5",
]
LAYOUTS = {  # world size, overrides
    "micro-batch 8": (1, ["training.micro_batch_size=8"]),
    "micro-batch 2 x 4 accumulated": (1, ["training.micro_batch_size=2"]),
    "DP=2 x micro-batch 2 x 2": (2, ["training.micro_batch_size=2"]),
    "TP=2 + SP, micro-batch 4 x 2": (
        2, ["training.micro_batch_size=4", "parallel.tensor=2", "parallel.sequence_parallel=true"]
    ),
}
OBJECTIVES = {
    "group, full": ["simreg.reduction=group"],
    "token, full": ["simreg.reduction=token"],
    "group, chunk 16": ["simreg.reduction=group", "simreg.mode=chunk", "simreg.chunk_size=16"],
    "token, chunk 16": ["simreg.reduction=token", "simreg.mode=chunk", "simreg.chunk_size=16"],
}
LR = 2e-3  # tiny-llama.yaml's optimizer.lr; the step below runs without a scheduler, so at this rate


def one_step_worker(rank, world, layout, checkpoint, save, objectives=None):
    """For each objective: the shared weights, one forward/backward of the global batch, one optimizer step."""
    from megatron_simreg import parallel

    results = {}
    first = load_config("configs/tiny-llama.yaml", GLOBAL_BATCH + layout)
    parallel.initialize(first)
    try:
        if save:
            model_with_shared_weights(first, checkpoint, save=True)
        for name, objective in (objectives or OBJECTIVES).items():
            cfg = load_config("configs/tiny-llama.yaml", GLOBAL_BATCH + layout + objective)
            model, optimizer = model_with_shared_weights(cfg, checkpoint, save=False)
            optimizer.zero_grad()
            metrics = forward_backward(cfg, model, masked=False)
            grads = gathered_grads(model.module)
            optimizer.step()
            results[name] = metrics, grads, gathered(model.module, lambda param: param if param.requires_grad else None)
    finally:
        parallel.destroy()
    return results


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    return layout_steps(str(tmp_path_factory.mktemp("weights") / "weights"))


def layout_steps(checkpoint, objectives=None):
    """Each layout's one step for each objective: {layout: {objective: (metrics, grads, params)}}."""
    runs = {}
    for layout, (world, overrides) in LAYOUTS.items():
        per_rank = run_distributed(one_step_worker, world, overrides, checkpoint, not runs, objectives)
        runs[layout] = {name: merged([(r[name][0], r[name][1]) for r in per_rank]) + (per_rank[0][name][2],)
                        for name in objectives or OBJECTIVES}
    return runs


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "micro-batch 8"])
def test_one_step_is_the_same_whatever_the_batch_layout(steps, layout, objective):
    assert steps["micro-batch 8"][objective][0]["simreg"] > 1e-3, "SimReg must weigh in this step"
    assert_same_step(steps[layout][objective], steps["micro-batch 8"][objective], ("lm loss", "simreg"))


def assert_same_step(got, want, keys):
    metrics, grads, params = got
    want_metrics, want_grads, want_params = want
    for key in keys:
        assert metrics[key] == pytest.approx(want_metrics[key], rel=LOSS_REL), key
    for name, want in want_grads.items():
        # fp32 gradients summed in another order (per micro-batch, then across them and ranks) differ by a few
        # ulps of the summands: 1e-5 of the tensor's largest entry bounds that, while a changed objective
        # moved them by 23% (group reduction normalised per micro-batch).
        scale = want.abs().max().item()
        torch.testing.assert_close(grads[name], want, rtol=0, atol=1e-5 * scale, msg=name)
    for name, want in want_params.items():
        # Adam's first step moves an entry by lr * g / (|g| + eps): by lr whatever |g| is, except where |g| is
        # within a few eps of zero, where ulp-level gradient differences can flip the sign. Entries agree to
        # lr / 100 unless the gradient is that small.
        tiny = want_grads[name].abs() < 1e3 * 1e-8
        torch.testing.assert_close(params[name][~tiny], want[~tiny], rtol=0, atol=LR / 100, msg=name)
