"""AdaGC against a plain reference, a gradient spike, sharded layouts over gloo, and exact resume."""

import math

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_simreg.adagc import AdaGC, AdaGCConfig, GradShard

SHAPES = {"embedding": (8, 6), "attention.weight": (6, 6), "norm.weight": (6,)}


def reference_adagc(grad_steps, config):
    """Straight from the NOTES: warm-up global clipping with min-tracking, then per-tensor EMA clipping."""
    gamma, out = {}, []
    for t, grads in enumerate(grad_steps, 1):
        grads = {k: v.clone() for k, v in grads.items()}
        norms = {k: v.norm().item() for k, v in grads.items()}
        if t <= config.warmup_steps:
            total = math.sqrt(sum(n * n for n in norms.values()))
            coefficient = min(1.0, config.warmup_max_norm / (total + config.eps))
            for k, n in norms.items():
                gamma[k] = n if t == 1 else min(gamma[k], n)
                grads[k] *= coefficient
        else:
            for k, n in norms.items():
                if n > config.lambda_rel * gamma[k]:
                    grads[k] *= config.lambda_rel * gamma[k] / (n + config.eps)
                    n = config.lambda_rel * gamma[k]
                gamma[k] = config.beta * gamma[k] + (1 - config.beta) * n
        out.append(grads)
    return out, gamma


def random_steps(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=gen) * (0.5 + torch.rand(1, generator=gen).item() * 2) for k, s in SHAPES.items()} for _ in range(n)]


def test_matches_reference_through_the_warmup_boundary():
    config = AdaGCConfig(warmup_steps=5)
    steps = random_steps(30)
    expected, expected_gamma = reference_adagc(steps, config)
    adagc = AdaGC(config)
    for grads, want in zip(steps, expected):
        grads = {k: v.clone() for k, v in grads.items()}
        adagc.clip([GradShard(k, g) for k, g in grads.items()])
        for k in grads:
            torch.testing.assert_close(grads[k], want[k], rtol=1e-6, atol=1e-7)
    assert adagc.gamma == pytest.approx(expected_gamma, rel=1e-9)


def test_spike_on_one_tensor_is_clipped_alone():
    config = AdaGCConfig(warmup_steps=3)
    adagc = AdaGC(config)
    for grads in random_steps(10, seed=1):
        adagc.clip([GradShard(k, g) for k, g in grads.items()])
    gamma_before = dict(adagc.gamma)
    spiked = random_steps(1, seed=2)[0]
    spiked["attention.weight"] *= 100
    originals = {k: v.clone() for k, v in spiked.items()}
    stats = adagc.clip([GradShard(k, g) for k, g in spiked.items()])
    limit = config.lambda_rel * gamma_before["attention.weight"]
    assert spiked["attention.weight"].norm().item() == pytest.approx(limit, rel=1e-5)
    assert stats.num_clipped >= 1 and stats.grad_norm > stats.clipped_grad_norm
    for k in ("embedding", "norm.weight"):
        if originals[k].norm() <= config.lambda_rel * gamma_before[k]:
            assert torch.equal(spiked[k], originals[k])
    # the EMA takes the clipped norm: it moves by at most (1 - beta) * (lambda - 1) relative
    assert adagc.gamma["attention.weight"] <= gamma_before["attention.weight"] * (1 + (1 - config.beta) * (config.lambda_rel - 1)) + 1e-12


def test_resume_clips_exactly_like_an_uninterrupted_run():
    config = AdaGCConfig(warmup_steps=4)
    steps = random_steps(20, seed=3)
    straight, resumed = AdaGC(config), AdaGC(config)
    for grads in steps[:10]:
        straight.clip([GradShard(k, g.clone()) for k, g in grads.items()])
        resumed.clip([GradShard(k, g.clone()) for k, g in grads.items()])
    restored = AdaGC(config)
    restored.load_state_dict(resumed.state_dict())
    for grads in steps[10:]:
        a = {k: g.clone() for k, g in grads.items()}
        b = {k: g.clone() for k, g in grads.items()}
        straight.clip([GradShard(k, g) for k, g in a.items()])
        restored.clip([GradShard(k, g) for k, g in b.items()])
        for k in a:
            assert torch.equal(a[k], b[k])
    assert restored.gamma == straight.gamma and restored.step == straight.step == 20


def test_global_variant_scales_all_tensors_alike():
    adagc = AdaGC(AdaGCConfig(warmup_steps=1, variant="global"))
    steps = random_steps(2, seed=4)
    adagc.clip([GradShard(k, g) for k, g in steps[0].items()])
    grads = {k: g * 50 for k, g in steps[1].items()}
    before = {k: g.clone() for k, g in grads.items()}
    adagc.clip([GradShard(k, g) for k, g in grads.items()])
    ratios = {k: (grads[k].norm() / before[k].norm()).item() for k in grads}
    first = next(iter(ratios.values()))
    assert first < 1 and all(r == pytest.approx(first, rel=1e-5) for r in ratios.values())


def sharded_worker(rank, world, steps, layout):
    """TP-split tensors are split by rows over ranks; replicated ones are on both, counted once;
    distributed-optimizer shards split each flattened tensor over ranks."""
    adagc = AdaGC(AdaGCConfig(warmup_steps=4))
    world_group = dist.group.WORLD
    results = []
    for grads in steps:
        shards = []
        for name, grad in grads.items():
            if layout == "tp" and name != "norm.weight":
                shard = grad.chunk(world, dim=0)[rank].clone()
                shards.append(GradShard(name, shard, norm_groups=(world_group,), global_groups=(world_group,)))
            elif layout == "tp":
                shards.append(GradShard(name, grad.clone(), global_groups=(world_group,), counted=rank == 0))
            else:  # distributed optimizer: contiguous pieces of the flattened tensor
                flat = grad.flatten()
                piece = flat.tensor_split(world)[rank].clone()
                shards.append(GradShard(name, piece, norm_groups=(world_group,), global_groups=(world_group,)))
        stats = adagc.clip(shards)
        results.append(([s.grad for s in shards], stats.grad_norm, stats.clipped_grad_norm))
    return results, adagc.gamma


@pytest.mark.parametrize("layout", ["tp", "dp_shards"])
def test_sharded_layouts_clip_like_the_unsharded_run(layout):
    steps = random_steps(12, seed=5)
    for grads in steps[8:]:
        grads["embedding"] *= 30  # force per-tensor clipping after warm-up
    single = AdaGC(AdaGCConfig(warmup_steps=4))
    expected = []
    for grads in steps:
        g = {k: v.clone() for k, v in grads.items()}
        stats = single.clip([GradShard(k, v) for k, v in g.items()])
        expected.append((g, stats.grad_norm, stats.clipped_grad_norm))
    per_rank = run_distributed(sharded_worker, 2, steps, layout)
    for rank, (results, gamma) in enumerate(per_rank):
        assert gamma == pytest.approx(single.gamma, rel=1e-6)
        for (shards, before, after), (want, want_before, want_after) in zip(results, expected):
            assert before == pytest.approx(want_before, rel=1e-6) and after == pytest.approx(want_after, rel=1e-6)
            for shard, name in zip(shards, SHAPES):
                if layout == "tp" and name != "norm.weight":
                    target = want[name].chunk(2, dim=0)[rank]
                elif layout == "tp":
                    target = want[name]
                else:
                    target = want[name].flatten().tensor_split(2)[rank]
                torch.testing.assert_close(shard, target, rtol=1e-6, atol=1e-7)
