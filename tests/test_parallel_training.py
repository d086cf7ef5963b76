"""Parallel layouts with SimReg on, over gloo: losses and gathered gradients equal the single-process run.

The single-process model's weights are saved with megatron-core's distributed checkpointing and loaded
into each layout (the library reshards them), then one training step's forward and backward runs
through the local loop's DDP, optimizer wrapper and megatron's schedules. Context parallelism runs with
an exact stand-in for Transformer Engine's attention (`context_parallel_attention.py`), the only part of
a CP model that megatron-core cannot run on a CPU.
"""

import os
import re

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_simreg.config import load_config

BASE = [
    "model.seq_length=32", "model.num_layers=2", "training.micro_batch_size=2", "training.global_batch_size=4",
    "schedule.train_iters=10", "schedule.warmup_steps=2", "simreg.temperature=0.1", "simreg.block_size=8",
]


def batch_for(seed=0, micro_batches=2, micro_batch=2, seq=32, masked=True):
    """Token ids with repeats (so SimReg has positives), the same on every rank; 10% of the loss masked."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (micro_batches * micro_batch, seq + 1), generator=gen)
    mask = (torch.rand(micro_batches * micro_batch, seq, generator=gen) > 0.1) if masked else torch.ones(tokens[:, 1:].shape)
    return {
        "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask.float(),
        "position_ids": torch.arange(seq).expand(micro_batches * micro_batch, seq).clone(),
    }


def model_with_shared_weights(cfg, checkpoint, save):
    """The layout's model and optimizer, holding the single-process run's weights (resharded by megatron)."""
    from megatron.core import dist_checkpointing

    from megatron_simreg.local_loop import build_model_and_optimizer

    model, optimizer = build_model_and_optimizer(cfg)
    if save:
        os.makedirs(checkpoint, exist_ok=True)
        dist_checkpointing.save(model.module.sharded_state_dict(), checkpoint)
    else:
        model.module.load_state_dict(dist_checkpointing.load(model.module.sharded_state_dict(), checkpoint))
    return model, optimizer


def forward_backward(cfg, model, seed=0, masked=True):
    """One global batch through megatron's schedule; this rank's share of it; the reduced report."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_simreg.batches import on_this_rank
    from megatron_simreg.local_loop import schedule_of
    from megatron_simreg.objective import SimRegObjective, forward_step, reduce_reports

    schedule = schedule_of(cfg, parallel_state.get_data_parallel_world_size())
    dp, dp_rank, mbs = schedule.data_parallel, parallel_state.get_data_parallel_rank(), cfg.training.micro_batch_size
    full = batch_for(seed=seed, micro_batches=cfg.training.global_batch_size // mbs, masked=masked)
    micro = [{k: v[(m * dp + dp_rank) * mbs:(m * dp + dp_rank + 1) * mbs] for k, v in full.items()}
             for m in range(schedule.micro_batches)]
    model.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=lambda it, m: forward_step(SimRegObjective.from_config(cfg), lambda i: on_this_rank(next(i)), it, m),
        data_iterator=iter(micro), model=[model], num_microbatches=schedule.micro_batches,
        seq_length=cfg.model.seq_length, micro_batch_size=mbs, forward_only=False,
    )
    return reduce_reports(reports, parallel_state.get_data_parallel_group(with_context_parallel=True)) if reports else None


def step_worker(rank, world, overrides, checkpoint, save, masked=True):
    from megatron_simreg import parallel

    cfg = load_config("configs/tiny-llama.yaml", BASE + overrides)
    if cfg.parallel.context > 1:  # only Transformer Engine's attention (GPU) does CP; an exact stand-in here
        import context_parallel_attention

        context_parallel_attention.use_on_cpu()
    parallel.initialize(cfg)
    try:
        model, _ = model_with_shared_weights(cfg, checkpoint, save)
        metrics = forward_backward(cfg, model, masked=masked)
        return metrics, gathered_grads(model.module)
    finally:
        parallel.destroy()


def gathered_grads(model):
    """Every parameter's gradient as the single-process model would name and shape it."""
    from megatron.core import parallel_state

    out = {}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for name, param in model.named_parameters():
        grad = param.main_grad.detach().clone()
        if getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_world_size() > 1:
            pieces = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(pieces, grad.contiguous(), group=tp_group)
            if name.endswith("linear_fc1.weight"):  # SwiGLU: each rank holds [gate shard; up shard]
                gates, ups = zip(*(piece.chunk(2, dim=0) for piece in pieces))
                pieces = list(gates) + list(ups)
            grad = torch.cat(pieces, dim=param.partition_dim)
        out[_global_name(model, name, ep_rank)] = grad
    return out


def _global_name(model, name, ep_rank):
    match = re.search(r"layers\.(\d+)\.", name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        name = name.replace(match.group(0), f"layers.{layer.layer_number - 1}.", 1)
        experts = re.search(r"local_experts\.(\d+)\.", name)
        if experts:
            per_rank = len(layer.mlp.experts.local_experts)
            name = name.replace(experts.group(0), f"local_experts.{ep_rank * per_rank + int(experts.group(1))}.", 1)
    return name


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


def merged(per_rank):
    grads, metrics = {}, None
    for rank_metrics, rank_grads in per_rank:
        metrics = metrics or rank_metrics
        for name, grad in rank_grads.items():
            if name in grads:
                torch.testing.assert_close(grad, grads[name])  # replicas agree
            grads[name] = grad
    return metrics, grads


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The single-process run each layout is compared with (its weights saved for the layout to load),
    computed once per distinct reference: most layouts share the plain one."""
    runs = {}

    def run(overrides: tuple, masked: bool):
        if (overrides, masked) not in runs:
            checkpoint = str(tmp_path_factory.mktemp("weights") / "weights")
            runs[overrides, masked] = checkpoint, merged(run_distributed(step_worker, 1, list(overrides), checkpoint, True, masked))
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
        assert got[0][key] == pytest.approx(expected[0][key], rel=1e-5, abs=1e-7), key
    assert expected[0]["simreg"] > 1e-4, "SimReg should contribute to this step"
    assert sorted(got[1]) == sorted(expected[1])
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_expert_parallel_mixtral_matches_single_process(tmp_path):
    checkpoint = str(tmp_path / "weights")
    moe = ["model.num_experts=4", "model.moe_ffn_hidden_size=32", "parallel.moe_token_dispatcher=allgather"]
    expected = merged(run_distributed(step_worker, 1, moe, checkpoint, True))
    got = merged(run_distributed(step_worker, 2, moe + ["parallel.expert=2"], checkpoint, False))
    assert got[0]["lm loss"] == pytest.approx(expected[0]["lm loss"], rel=1e-5)
    assert got[0]["simreg"] == pytest.approx(expected[0]["simreg"], rel=1e-5)
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


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
        for name in gamma:
            assert gamma[name] == pytest.approx(expected_gamma[name], rel=1e-4), name
        for (norm, clipped, count), (want_norm, want_clipped, want_count) in zip(stats, expected_stats):
            assert norm == pytest.approx(want_norm, rel=1e-4) and clipped == pytest.approx(want_clipped, rel=1e-4)
            assert count == want_count
