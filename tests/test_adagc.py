"""AdaGC core: against a plain reference, a gradient spike, sharded layouts over gloo, and exact resume."""

import math

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from megatron_simreg.adagc import AdaGC, AdaGCConfig, GradShard

SHAPES = {"embedding": (8, 6), "attention.weight": (6, 6), "norm.weight": (6,), "output.weight": (4, 6)}
# AdaGC takes fp32 norms (torch._foreach_norm); the references are float64. A sum of n <= 48 squares is within
# n * 2^-24 ~ 3e-6 relative of the exact value whatever order a CPU's vector width sums in; a clip coefficient
# is a ratio of two such norms, and the thresholds' EMA only averages them. 1e-5 bounds all of these.
FP32_NORM_REL = 1e-5


def reference_adagc(grad_steps, config):
    """Straight from NOTES.md: warm-up global clipping with min-tracking, then per-tensor EMA clipping."""
    gamma, out = {}, []
    for t, grads in enumerate(grad_steps, 1):
        grads = {k: v.clone().double() for k, v in grads.items()}
        norms = {k: v.norm().item() for k, v in grads.items()}
        if t <= config.warmup_steps:
            total = math.sqrt(sum(n * n for n in norms.values()))
            coefficient = min(1.0, config.warmup_max_norm / (total + config.eps))
            for k, n in norms.items():
                seen = n * coefficient if config.warmup_gamma == "clipped" else n
                gamma[k] = seen if t == 1 else min(gamma[k], seen)
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
    """Gradients with a steady scale per tensor, a noisy one per step, and the odd larger step."""
    gen = torch.Generator().manual_seed(seed)
    scales = {k: 0.2 + 2 * torch.rand(1, generator=gen).item() for k in SHAPES}
    return [{k: torch.randn(*s, generator=gen) * scales[k] * (0.8 + 0.6 * torch.rand(1, generator=gen).item())
             for k, s in SHAPES.items()} for _ in range(n)]


def clip_all(adagc, grads):
    return adagc.clip([GradShard(k, g) for k, g in grads.items()])


def clip_and_compare(adagc, grads, want):
    """Clip a copy of one step's gradients and check each against the reference's; AdaGC's statistics."""
    grads = {k: v.clone() for k, v in grads.items()}
    stats = clip_all(adagc, grads)
    for k in grads:
        torch.testing.assert_close(grads[k].double(), want[k], rtol=FP32_NORM_REL, atol=0)
    return stats


@pytest.mark.parametrize("warmup_gamma", ["raw", "clipped"])
def test_matches_reference_through_the_warmup_boundary(warmup_gamma):
    config = AdaGCConfig(warmup_steps=5, warmup_gamma=warmup_gamma)
    steps = random_steps(40)
    expected, expected_gamma = reference_adagc(steps, config)
    adagc = AdaGC(config)
    clipped_after_warmup = 0
    for t, (grads, want) in enumerate(zip(steps, expected), 1):
        stats = clip_and_compare(adagc, grads, want)
        assert stats.grad_norm == pytest.approx(
            math.sqrt(sum(g.norm() ** 2 for g in steps[t - 1].values())), rel=FP32_NORM_REL
        )
        assert stats.clipped_grad_norm == pytest.approx(
            math.sqrt(sum(g.norm() ** 2 for g in want.values())), rel=FP32_NORM_REL
        )
        if t > config.warmup_steps:
            clipped_after_warmup += stats.num_clipped
    assert adagc.gamma == pytest.approx(expected_gamma, rel=FP32_NORM_REL)
    assert clipped_after_warmup > 0  # the per-tensor branch did clip, not only pass through


def official_patch_adagc(grad_steps, clip_ratio=1.04, beta=0.99, eps=1e-6, start_clip_steps=100, max_norm=1.0):
    """The official Megatron patch's `AdaGC.clip_by_norm` (lishuai-97/AdaGC), transcribed in float64.

    Warm-up: global clipping in place first, then the per-tensor state collects the minimum norm of the
    CLIPPED gradient. After: clip a tensor to clip_ratio * state and take the clipped norm into the EMA.
    """
    state, out = {}, []
    for step, grads in enumerate(grad_steps, 1):
        grads = {k: v.clone().double() for k, v in grads.items()}
        total_norm = math.sqrt(sum(g.norm().item() ** 2 for g in grads.values()))
        if step <= start_clip_steps:
            clip_coeff = max_norm / (total_norm + eps)
            if clip_coeff < 1.0:
                for g in grads.values():
                    g.mul_(clip_coeff)
            for k, g in grads.items():
                norm_value = g.norm().item()
                if k not in state or norm_value < state[k]:
                    state[k] = norm_value
        else:
            for k, g in grads.items():
                norm_value, avg_norm_value = g.norm().item(), state[k]
                if norm_value > clip_ratio * avg_norm_value:
                    g.mul_(clip_ratio * avg_norm_value / (norm_value + eps))
                    norm_value = clip_ratio * avg_norm_value
                state[k] = avg_norm_value * beta + norm_value * (1.0 - beta)
        out.append(grads)
    return out, state


def test_default_config_clips_as_the_official_patch_over_150_steps_with_spikes():
    steps = random_steps(150, seed=11)
    for t, key in ((105, "attention.weight"), (120, "embedding"), (121, "embedding"), (140, "norm.weight")):
        steps[t - 1][key] *= 30  # loss spikes after the warm-up
    for grads in steps[:100:7]:
        for g in grads.values():
            g *= 4  # global norms above warmup_max_norm during the warm-up: clipped and raw norms differ
    expected, expected_state = official_patch_adagc(steps)
    adagc = AdaGC(AdaGCConfig())  # the defaults users train with
    clipped_spikes = 0
    for t, (grads, want) in enumerate(zip(steps, expected), 1):
        stats = clip_and_compare(adagc, grads, want)
        clipped_spikes += t in (105, 120, 121, 140) and stats.num_clipped > 0
    assert adagc.gamma == pytest.approx(expected_state, rel=FP32_NORM_REL)
    assert clipped_spikes == 4


def test_bf16_gradients_are_clipped_in_place_with_fp32_norms():
    config = AdaGCConfig(warmup_steps=2)
    steps = random_steps(6, seed=7)
    full, low = AdaGC(config), AdaGC(config)
    for grads in steps:
        grads[next(iter(SHAPES))] *= 5
        reference = {k: v.clone() for k, v in grads.items()}
        halves = {k: v.to(torch.bfloat16) for k, v in grads.items()}
        clip_all(full, reference)
        clip_all(low, halves)
        for k in grads:
            assert halves[k].dtype == torch.bfloat16
            # Three bf16 roundings (the input, the norm behind the coefficient, the scaled output), each within
            # 2^-8 relative: 1.2e-2 per entry; 2e-2 bounds it (atol for entries a rounding moved across zero: none).
            torch.testing.assert_close(halves[k].float(), reference[k], rtol=2e-2, atol=1e-3)
    assert low.gamma == pytest.approx(full.gamma, rel=1e-2)  # norms of bf16-rounded inputs: within 2^-8 each, averaged


def test_spike_on_one_tensor_is_clipped_alone():
    config = AdaGCConfig(warmup_steps=3)
    adagc = AdaGC(config)
    for grads in random_steps(10, seed=1):
        clip_all(adagc, grads)
    gamma_before = dict(adagc.gamma)
    # every tensor at exactly its threshold gamma, then a 100x spike on one of them
    spiked = {k: g / g.norm() * gamma_before[k] for k, g in random_steps(1, seed=2)[0].items()}
    spiked["attention.weight"] *= 100
    originals = {k: v.clone() for k, v in spiked.items()}
    stats = clip_all(adagc, spiked)
    limit = config.lambda_rel * gamma_before["attention.weight"]
    assert spiked["attention.weight"].norm().item() == pytest.approx(limit, rel=FP32_NORM_REL)
    assert stats.num_clipped == 1
    assert stats.min_clip_coeff == pytest.approx(limit / (100 * gamma_before["attention.weight"]), rel=FP32_NORM_REL)
    for k in SHAPES:
        if k != "attention.weight":
            assert torch.equal(spiked[k], originals[k]), k
            assert adagc.gamma[k] == pytest.approx(gamma_before[k], rel=FP32_NORM_REL)  # EMA of its own norm: unchanged
    # the EMA takes the clipped norm, so the spike moves it by (1 - beta) * (lambda - 1), here 0.04%
    moved = adagc.gamma["attention.weight"] / gamma_before["attention.weight"] - 1
    # float64 arithmetic on the threshold itself (the clipped norm is exactly lambda_rel * gamma): exact to 1e-12
    assert moved == pytest.approx((1 - config.beta) * (config.lambda_rel - 1), rel=1e-9)


def test_resume_from_a_saved_state_clips_exactly_like_an_uninterrupted_run(tmp_path):
    config = AdaGCConfig(warmup_steps=4)
    steps = random_steps(20, seed=3)
    straight, interrupted = AdaGC(config), AdaGC(config)
    for grads in steps[:3]:  # stop inside the warm-up: the restart must not replay it
        clip_all(straight, {k: g.clone() for k, g in grads.items()})
        clip_all(interrupted, {k: g.clone() for k, g in grads.items()})
    torch.save(interrupted.state_dict(), tmp_path / "adagc.pt")
    restored = AdaGC(AdaGCConfig(warmup_steps=4))
    restored.load_state_dict(torch.load(tmp_path / "adagc.pt", weights_only=True))
    for grads in steps[3:]:
        a = {k: g.clone() for k, g in grads.items()}
        b = {k: g.clone() for k, g in grads.items()}
        assert clip_all(straight, a) == clip_all(restored, b)
        for k in a:
            assert torch.equal(a[k], b[k])
    assert restored.gamma == straight.gamma and restored.step == straight.step == 20


def test_global_variant_scales_all_tensors_alike():
    adagc = AdaGC(AdaGCConfig(warmup_steps=1, variant="global"))
    steps = random_steps(2, seed=4)
    clip_all(adagc, steps[0])
    threshold = adagc.config.lambda_rel * adagc.gamma["<global>"]
    grads = {k: g * 50 for k, g in steps[1].items()}
    before = {k: g.clone() for k, g in grads.items()}
    stats = clip_all(adagc, grads)
    ratios = {k: (grads[k].norm() / before[k].norm()).item() for k in grads}
    assert all(r == pytest.approx(stats.min_clip_coeff, rel=FP32_NORM_REL) for r in ratios.values())
    assert stats.clipped_grad_norm == pytest.approx(threshold, rel=FP32_NORM_REL) and stats.num_clipped == len(SHAPES)


def test_bad_settings_and_states_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="adagc.variant must be one of tensor, shard, global"):
        AdaGCConfig(variant="layer")
    with pytest.raises(ValueError, match="adagc.beta"):
        AdaGCConfig(beta=1.0)
    with pytest.raises(ValueError, match="warmup_steps must be at least 1"):
        AdaGCConfig(warmup_steps=0)
    with pytest.raises(ValueError, match="several gradients named"):
        AdaGC().clip([GradShard("w", torch.ones(2)), GradShard("w", torch.ones(2))])
    saved = AdaGC(AdaGCConfig(variant="global")).state_dict()
    with pytest.raises(ValueError, match="set adagc.variant=global"):
        AdaGC().load_state_dict(saved)
    adagc = AdaGC(AdaGCConfig(warmup_steps=1))
    adagc.clip([GradShard("w", torch.ones(2))])
    with pytest.raises(ValueError, match="no threshold for 'new'"):
        adagc.clip([GradShard("w", torch.ones(2)), GradShard("new", torch.ones(2))])


# --- sharded layouts over gloo -------------------------------------------------------------------------

LAYOUTS = ("tp", "dp_shards", "tp_shard_variant", "tp_global_variant")
SPLIT = ("embedding", "attention.weight", "output.weight")  # split by rows under TP; norm.weight replicated
CONFIGS = {
    "tp": {}, "dp_shards": {}, "tp_shard_variant": {"variant": "shard"}, "tp_global_variant": {"variant": "global"},
}


def pieces(grads, layout, rank, world, group):
    """This rank's pieces of the whole gradients, with the groups a layout gives them."""
    if layout == "dp_shards":  # the distributed optimizer: one flat buffer cut in contiguous, equal ranges
        flat = torch.cat([g.flatten() for g in grads.values()])
        start, end = [(r * flat.numel() // world, (r + 1) * flat.numel() // world) for r in range(world)][rank]
        out, offset = [], 0
        for name, grad in grads.items():
            lo, hi = max(start, offset), min(end, offset + grad.numel())
            piece = grad.flatten()[lo - offset:hi - offset] if lo < hi else grad.new_empty(0)
            out.append(GradShard(name, piece.clone(), shard_group=group, global_group=group))
            offset += grad.numel()
        return out
    out = []
    for name, grad in grads.items():
        if name in SPLIT:
            piece = grad.chunk(world, dim=0)[rank].clone()
            out.append(GradShard(name, piece, split_group=group, global_group=group))
        else:
            out.append(GradShard(name, grad.clone(), global_group=group, counted=rank == 0))
    return out


def unsharded(grads, layout, world):
    """The single-process view of a step: whole tensors, or for the `shard` variant each TP piece as its
    own tensor (named `name/rank`)."""
    if layout != "tp_shard_variant":
        return [GradShard(k, g.clone()) for k, g in grads.items()]
    return [GradShard(f"{k}/{r}", g.chunk(world, dim=0)[r].clone()) for k, g in grads.items() if k in SPLIT
            for r in range(world)] + [GradShard(k, grads[k].clone()) for k in grads if k not in SPLIT]


def sharded_worker(rank, world, steps):
    results = {}
    for layout in LAYOUTS:
        adagc = AdaGC(AdaGCConfig(warmup_steps=4, **CONFIGS[layout]))
        trace = []
        for grads in steps:
            shards = pieces(grads, layout, rank, world, dist.group.WORLD)
            stats = adagc.clip(shards)
            trace.append(({s.name: s.grad for s in shards}, stats))
        results[layout] = (trace, adagc.gamma)
    return results


@pytest.fixture(scope="module")
def sharded_runs():
    steps = random_steps(14, seed=5)
    for t, grads in enumerate(steps[8:]):
        grads[SPLIT[t % 3]] *= 30  # spikes after warm-up, on split tensors
        grads["norm.weight"] *= 1 + 10 * (t % 2)  # and on the replicated one
    return steps, run_distributed(sharded_worker, 2, steps)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_layouts_clip_like_the_unsharded_run(layout, sharded_runs):
    steps, per_rank = sharded_runs
    single = AdaGC(AdaGCConfig(warmup_steps=4, **CONFIGS[layout]))
    expected = []
    for grads in steps:
        shards = unsharded(grads, layout, 2)
        expected.append(({s.name: s.grad for s in shards}, single.clip(shards)))
    assert sum(stats.num_clipped for _, stats in expected[4:]) > 0
    for rank, results in enumerate(per_rank):
        trace, gamma = results[layout]
        if layout == "tp_shard_variant":
            assert all(single.gamma[f"{k}/{rank}"] == pytest.approx(gamma[k], rel=FP32_NORM_REL) for k in SPLIT)
        else:  # the same fp32 squares summed over shards and ranks in another order
            assert gamma == pytest.approx(single.gamma, rel=FP32_NORM_REL)
        for (got, stats), (whole, want) in zip(trace, expected):
            assert stats.grad_norm == pytest.approx(want.grad_norm, rel=FP32_NORM_REL)
            assert stats.clipped_grad_norm == pytest.approx(want.clipped_grad_norm, rel=FP32_NORM_REL)
            assert stats.min_clip_coeff == pytest.approx(want.min_clip_coeff, rel=FP32_NORM_REL)
            assert stats.num_clipped == want.num_clipped
            cut = pieces({k: whole[k] for k in SHAPES} if layout != "tp_shard_variant" else
                         {k: (torch.cat([whole[f"{k}/{r}"] for r in range(2)]) if k in SPLIT else whole[k])
                          for k in SHAPES},
                         layout, rank, 2, None)
            for shard in cut:
                torch.testing.assert_close(got[shard.name], shard.grad, rtol=FP32_NORM_REL, atol=0)
