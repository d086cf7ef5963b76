"""Parallel layouts with SimReg on, over gloo: losses and gathered gradients equal the single-process run.

The single-process model's weights are saved with megatron-core's distributed checkpointing and loaded
into each layout (the library reshards them), then one training step's forward and backward runs
through the local loop's DDP, optimizer wrapper and megatron's schedules. Context parallelism runs with
an exact stand-in for Transformer Engine's attention (`context_parallel_attention.py`), the only part of
a CP model that megatron-core cannot run on a CPU.
"""

import contextlib

import pytest
import torch
from distributed import run_distributed
from layout_steps import (
    BASE,
    GRAD_RTOL,
    LOSS_REL,
    assert_gradients_close,
    forward_backward,
    gathered_grads,
    merged,
    model_with_shared_weights,
)

from megatron_simreg.config import load_config


def step_worker(rank, world, overrides, checkpoint, save, masked=True, seed=0):
    from megatron_simreg import parallel

    cfg = load_config("configs/tiny-llama.yaml", BASE + overrides)
    if cfg.parallel.context > 1:  # only Transformer Engine's attention (GPU) does CP; an exact stand-in here
        import context_parallel_attention

        context_parallel_attention.use_on_cpu()
    parallel.initialize(cfg)
    try:
        model, _ = model_with_shared_weights(cfg, checkpoint, save)
        margins = []
        with router_margins(model.module, margins):
            metrics = forward_backward(cfg, model, seed, masked=masked)
        if margins:
            metrics["router margin"] = min(margins)
        return metrics, gathered_grads(model.module)
    finally:
        parallel.destroy()


@contextlib.contextmanager
def router_margins(model, into: list):
    """Record each MoE router call's smallest gap between a token's k-th and (k+1)-th logits, relative to its
    largest logit: how close a token came to being routed to another expert."""
    from megatron.core.transformer.moe.router import TopKRouter

    def record(router, inputs, _output):
        with torch.no_grad():
            logits = router.gating(inputs[0]).float().flatten(0, -2)
        top = logits.topk(router.topk + 1, dim=-1).values
        into.append(((top[:, -2] - top[:, -1]).min() / logits.abs().max()).item())

    handles = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, TopKRouter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


LAYOUTS = {
    "TP=2": (2, ["parallel.tensor=2"]),
    "TP=2 + SP": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "PP=2": (2, ["parallel.pipeline=2"]),
    "DP=2": (2, []),
    "TP=2 + SP, chunk-wise": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "simreg.mode=chunk"]),
    "CP=2": (2, ["parallel.context=2"]),
    "CP=2, chunk-wise": (2, ["parallel.context=2", "simreg.mode=chunk"]),
}
SINGLE = {  # the single-process SimReg each layout must equal
    "TP=2 + SP, chunk-wise": ["simreg.mode=chunk", "simreg.chunk_size=16"],  # chunk = s / 2
    "CP=2, chunk-wise": ["simreg.mode=chunk", "simreg.chunk_size=8"],  # each zigzag chunk: s / 4
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The single-process run each layout is compared with (its weights saved for the layout to load),
    computed once per distinct reference: most layouts share the plain one."""
    runs = {}

    def run(overrides: tuple, masked: bool):
        if (overrides, masked) not in runs:
            checkpoint = str(tmp_path_factory.mktemp("weights") / "weights")
            runs[overrides, masked] = checkpoint, merged(
                run_distributed(step_worker, 1, list(overrides), checkpoint, True, masked)
            )
        return runs[overrides, masked]

    return run


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, single_process):
    world, overrides = LAYOUTS[layout]
    # Megatron divides each rank's loss by its own tokens (without --calculate-per-token-loss), which under
    # context parallelism equals the single-process mean when the ranks' shares have equal token counts,
    # as our datasets' all-ones loss masks give; a masked batch would weigh the halves differently.
    masked = "CP" not in layout
    checkpoint, expected = single_process(tuple(SINGLE.get(layout, [])), masked)
    got = merged(run_distributed(step_worker, world, overrides, checkpoint, False, masked))
    for key in ("lm loss", "simreg", "simreg lsr", "simreg negative angle"):
        assert got[0][key] == pytest.approx(expected[0][key], rel=LOSS_REL), key
    assert expected[0]["simreg"] > 1e-4, "SimReg should contribute to this step"
    assert sorted(got[1]) == sorted(expected[1])
    for name in expected[1]:
        assert_gradients_close(got[1][name], expected[1][name], name)


def test_expert_parallel_mixtral_matches_single_process(tmp_path):
    checkpoint = str(tmp_path / "weights")
    moe = ["model.num_experts=4", "model.moe_ffn_hidden_size=32", "parallel.moe_token_dispatcher=allgather"]
    # Top-k routing is discontinuous: the layouts' router logits differ by fp32 summation order, up to ~1e-5 of
    # |a||b| for a 64-term dot product (k * 2^-24) on top of upstream differences, about 1e-4 of the largest logit,
    # and a token whose k-th and (k+1)-th logits were closer than that could go to another expert in one layout,
    # which would be no bug. The batch of seed 3 routes every token with a margin of 2e-3 (seed 0's closest call
    # was 2.7e-5): the comparison rests on no near tie.
    expected = merged(run_distributed(step_worker, 1, moe, checkpoint, True, seed=3))
    assert expected[0]["router margin"] > 1e-4, "a near tie in the router: pick another batch for this comparison"
    got = merged(run_distributed(step_worker, 2, moe + ["parallel.expert=2"], checkpoint, False, seed=3))
    assert got[0]["lm loss"] == pytest.approx(expected[0]["lm loss"], rel=LOSS_REL)
    assert got[0]["simreg"] == pytest.approx(expected[0]["simreg"], rel=LOSS_REL)
    for name in expected[1]:
        assert_gradients_close(got[1][name], expected[1][name], name)


def test_zero_weight_gives_exactly_cross_entropy(tmp_path):
    checkpoint = str(tmp_path / "weights")
    without = merged(run_distributed(step_worker, 1, ["simreg.enabled=false"], checkpoint, True))
    logged = merged(run_distributed(step_worker, 1, ["simreg.weight=0"], checkpoint, False))
    assert logged[0]["lm loss"] == without[0]["lm loss"] and logged[0]["simreg"] > 0
    for name in without[1]:
        assert torch.equal(logged[1][name], without[1][name]), name


def adagc_worker(rank, world, overrides, checkpoint, save):
    """Two optimizer steps with AdaGC (the second past its warm-up); its norms and thresholds."""
    from megatron_simreg import parallel
    from megatron_simreg.adagc import AdaGC
    from megatron_simreg.megatron_adagc import attach_adagc

    cfg = load_config("configs/tiny-llama.yaml", BASE + ["adagc.warmup_steps=1"] + overrides)
    parallel.initialize(cfg)
    try:
        model, optimizer = model_with_shared_weights(cfg, checkpoint, save)
        adagc = AdaGC(cfg.adagc)
        attach_adagc(optimizer, [model], adagc)
        stats = []
        for seed in (0, 1):
            optimizer.zero_grad()
            forward_backward(cfg, model, seed)
            optimizer.step()
            stats.append(optimizer.adagc_stats)
        return [(s.grad_norm, s.clipped_grad_norm, s.num_clipped) for s in stats], dict(adagc.gamma)
    finally:
        parallel.destroy()


@pytest.mark.parametrize("layout", ["DP=2", "TP=2"])
def test_adagc_on_megatron_optimizers_matches_single_process(layout, tmp_path):
    overrides = {"DP=2": [], "TP=2": ["parallel.tensor=2"]}[layout]
    checkpoint = str(tmp_path / "weights")
    (expected_stats, expected_gamma), = run_distributed(adagc_worker, 1, [], checkpoint, True)
    per_rank = run_distributed(adagc_worker, 2, overrides, checkpoint, False)
    for stats, gamma in per_rank:
        assert sorted(gamma) == sorted(expected_gamma)
        for name in gamma:  # norms of gradients that agree to GRAD_RTOL
            assert gamma[name] == pytest.approx(expected_gamma[name], rel=GRAD_RTOL), name
        for (norm, clipped, count), (want_norm, want_clipped, want_count) in zip(stats, expected_stats):
            assert (norm == pytest.approx(want_norm, rel=GRAD_RTOL)
                    and clipped == pytest.approx(want_clipped, rel=GRAD_RTOL))
            assert count == want_count
