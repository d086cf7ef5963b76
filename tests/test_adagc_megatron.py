"""AdaGC on real megatron-core optimizers over gloo: every layout clips like one process on whole tensors.

Each layout builds the tiny Mixtral (so a ChainedOptimizer of dense and expert parts), its DDP and
`get_megatron_optimizer` (Adam; Megatron's clip_grad left at 1.0 to show AdaGC replaces it), writes
known whole-tensor gradients, cut as the layout cuts them, into the DDP grad buffers (as if already
reduced), and runs `optimizer.step()`. The main gradients the optimizer stepped with (found through
megatron's own `main_param` handles and, for the distributed optimizer, its shard ranges) must equal
plain AdaGC on the whole tensors; so must the logged norms, clip counts, minimum coefficients and
thresholds. Half-way the AdaGC state goes through a file into a fresh AdaGC, which must carry on exactly.
"""

import io
import re
import zlib

import pytest
import torch
from distributed import run_distributed

from megatron_simreg.adagc import AdaGC, AdaGCConfig, GradShard
from megatron_simreg.config import load_config

STEPS, RESUME_AT, WARMUP = 6, 3, 2
SPIKES = {
    4: "decoder.layers.1.self_attention.linear_qkv.weight",
    5: "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight",
}
BASE = ["model.vocab_size=96", "model.seq_length=16"]
# The gradients are exact in bf16 and every layout reduces them in fp32, so layouts and the one-process reference
# differ only in how fp32 sums of squares are grouped (per shard, per rank, then all-reduced). torch's CPU
# reductions sum in a cascade, whose error is within ~log2(n) * 2^-24 ~ 1e-6 relative for n <= 6144 entries,
# whatever the vector width; two such sums, or a clip coefficient from them: 1e-5.
FP32_SUM_REL = 1e-5
LAYOUTS = {  # config overrides, gradients reduced in fp32
    "TP=2 fp32": (["parallel.tensor=2"], True),
    "PP=2 fp32": (["parallel.pipeline=2"], True),
    "EP=2 bf16, bf16 grad buffers": (["parallel.expert=2", "training.precision=bf16"], False),
    "DP=2 bf16 distributed optimizer": (["training.precision=bf16", "parallel.distributed_optimizer=true"], True),
}


def full_gradient(name, shape, step):
    """The whole tensor's gradient at a step, the same in every layout (and exact in bf16)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 100 + step)
    scale = (0.05 + torch.rand(1, generator=gen).item()) * (30.0 if SPIKES.get(step) == name else 1.0)
    return (torch.randn(shape, generator=gen) * scale / max(1, shape.numel()) ** 0.5).bfloat16().float()


def tensor_parallel_cut(param):
    """(dimension, pieces, this rank's piece) for a tensor-parallel split parameter, else None."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return None
    if getattr(param, "allreduce", True):
        return (param.partition_dim, parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    return (param.partition_dim, parallel_state.get_expert_tensor_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_rank())


def piece(full, cut):
    return full if cut is None else full.chunk(cut[1], dim=cut[0])[cut[2]]


def whole_shape(param, cut):
    shape = list(param.shape)
    if cut is not None:
        shape[cut[0]] *= cut[1]
    return torch.Size(shape)


def stepped_gradients(optimizer, names):
    """name -> (main gradient this rank stepped with, its tensor-parallel cut, its distributed-optimizer range)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = [p for p in optimizer.chained_optimizers if isinstance(p, DistributedOptimizer)]
    out = {}
    for param, name in names.items():
        main = getattr(param, "main_param", param)  # fp32 copy (or shard) of a bf16 weight, else itself
        if main is None or main.grad is None:
            continue  # the distributed optimizer keeps no piece of it on this rank
        span = next(
            (p._get_model_param_range_map(param)["param"] for p in parts if param in p.model_param_gbuf_map), None
        )
        out[name] = main.grad.detach().float().clone(), tensor_parallel_cut(param), span and (span.start, span.end)
    return out


def build(cfg, grads_in_fp32):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_simreg.model import model_provider

    model = model_provider(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage())
    distributed = cfg.parallel.distributed_optimizer
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=grads_in_fp32, use_distributed_optimizer=distributed), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-4, weight_decay=0.0, clip_grad=1.0,
        bf16=cfg.training.precision == "bf16", use_distributed_optimizer=distributed), [ddp])
    return ddp, optimizer


def layouts_worker(rank, world):
    """Every layout in turn in the same two processes (megatron's import is the slow part)."""
    return {layout: run_layout(layout) for layout in LAYOUTS}


def run_layout(layout):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_simreg.megatron_adagc import attach_adagc, parameter_names

    overrides, grads_in_fp32 = LAYOUTS[layout]
    cfg = load_config("configs/tiny-mixtral.yaml", BASE + overrides)
    parallel_state.initialize_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline,
                                             expert_model_parallel_size=cfg.parallel.expert)
    model_parallel_cuda_manual_seed(0)
    try:
        ddp, optimizer = build(cfg, grads_in_fp32)
        kind = (
            type(optimizer).__name__,
            sorted({type(p).__name__ for p in getattr(optimizer, "chained_optimizers", [])}),
        )
        names = parameter_names([ddp])
        adagc = AdaGC(AdaGCConfig(warmup_steps=WARMUP))
        attach_adagc(optimizer, [ddp], adagc)
        trace = []
        for step in range(1, STEPS + 1):
            if step == RESUME_AT + 1:  # through a file into a fresh AdaGC, as a restarted run would
                saved = io.BytesIO()
                torch.save(adagc.state_dict(), saved)
                adagc = AdaGC(AdaGCConfig(warmup_steps=WARMUP))
                adagc.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
                attach_adagc(optimizer, [ddp], adagc)
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            for param, name in names.items():
                cut = tensor_parallel_cut(param)
                param.main_grad.copy_(piece(full_gradient(name, whole_shape(param, cut), step), cut))
            updated, grad_norm, _ = optimizer.step()
            assert updated
            trace.append((grad_norm, optimizer.adagc_stats, stepped_gradients(optimizer, names)))
        shapes = {name: whole_shape(param, tensor_parallel_cut(param)) for param, name in names.items()}
        return kind, trace, shapes, dict(adagc.gamma)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def runs():
    return run_distributed(layouts_worker, 2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_optimizers_clip_like_adagc_on_whole_tensors(layout, runs):
    per_rank = [results[layout] for results in runs]
    shapes = {name: shape for *_, rank_shapes, _ in per_rank for name, shape in rank_shapes.items()}
    # plain AdaGC on the whole tensors of the whole model, one process
    reference, expected = AdaGC(AdaGCConfig(warmup_steps=WARMUP)), []
    for step in range(1, STEPS + 1):
        grads = {name: full_gradient(name, shape, step) for name, shape in shapes.items()}
        expected.append((reference.clip([GradShard(name, g) for name, g in grads.items()]), grads))
    assert sum(s.num_clipped for s, _ in expected[WARMUP:]) >= 2  # both spikes clipped after warm-up

    kind = per_rank[0][0]
    assert kind[0] == "ChainedOptimizer" and len(kind[1]) == 1  # dense + expert parts of one kind
    for _, trace, rank_shapes, gamma in per_rank:
        for (grad_norm, stats, stepped), (want, clipped) in zip(trace, expected):
            assert grad_norm == pytest.approx(want.grad_norm, rel=FP32_SUM_REL) == stats.grad_norm
            assert stats.clipped_grad_norm == pytest.approx(want.clipped_grad_norm, rel=FP32_SUM_REL)
            assert stats.min_clip_coeff == pytest.approx(want.min_clip_coeff, rel=FP32_SUM_REL)
            assert stats.num_clipped == want.num_clipped
            assert len(stepped) > len(rank_shapes) // 3  # the distributed optimizer holds about half on each rank
            for name, (grad, cut, span) in stepped.items():
                whole = piece(clipped[name], cut)
                torch.testing.assert_close(grad, whole.flatten()[span[0]:span[1]] if span else whole,
                                           rtol=FP32_SUM_REL, atol=1e-8, msg=name)  # atol: entries scaled to ~0
        for name, value in gamma.items():
            assert value == pytest.approx(reference.gamma[name], rel=FP32_SUM_REL), name
    assert set().union(*(gamma for *_, gamma in per_rank)) == set(reference.gamma)


def non_finite_step_worker(rank, world):
    from megatron_simreg import parallel
    from megatron_simreg.local_loop import build_model_and_optimizer
    from megatron_simreg.megatron_adagc import attach_adagc

    cfg = load_config("configs/tiny-llama.yaml", BASE + ["adagc.warmup_steps=1"])
    parallel.initialize(cfg)
    try:
        model, optimizer = build_model_and_optimizer(cfg)
        adagc = AdaGC(cfg.adagc)
        attach_adagc(optimizer, [model], adagc)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        outcomes = []
        for poison in (float("nan"), float("inf"), None):
            for p in model.parameters():
                p.main_grad.fill_(1e-3)
            if poison is not None:
                next(iter(model.parameters())).main_grad[0] = poison
            updated, norm, _ = optimizer.step()
            unchanged = all(torch.equal(p, before[name]) for name, p in model.named_parameters())
            outcomes.append((updated, norm, unchanged, adagc.step, dict(adagc.gamma)))
        return outcomes
    finally:
        parallel.destroy()


def test_adagc_skips_the_step_on_a_non_finite_gradient_norm():
    """A NaN or Inf gradient: no optimizer step (success False, as Megatron's loss scaler reports an overflow),
    weights and AdaGC's step count and thresholds untouched; the next finite step proceeds as the first."""
    nan, inf, finite = run_distributed(non_finite_step_worker, 1)[0]
    for updated, norm, unchanged, step, gamma in (nan, inf):
        assert updated is False and not torch.isfinite(torch.tensor(norm)) and unchanged and step == 0 and gamma == {}
    updated, norm, unchanged, step, gamma = finite
    assert updated is True and norm > 0 and not unchanged and step == 1 and len(gamma) > 0


def transformer_engine_name(name: str, moe: bool) -> str:
    """The name Transformer Engine's layers give the local layers' parameter `name`, read off megatron-core's TE
    layer spec (`gpt_layer_specs.get_gpt_layer_with_transformer_engine_submodules`; building it needs TE): there
    `input_layernorm` and, without experts, `pre_mlp_layernorm` are IdentityOp, their weights held as
    `layer_norm_weight` by the TELayerNormColumnParallelLinear after them (`linear_qkv`, `mlp.linear_fc1`); with
    experts `pre_mlp_layernorm` stays a norm (TENorm, `weight`) and, with `moe_grouped_gemm` (configs/base.yaml),
    TEGroupedMLP holds expert e's weights as `experts.linear_fc1.weight{e}` (its TEGroupedLinear's)."""
    name = re.sub(r"\.input_layernorm\.weight$", ".self_attention.linear_qkv.layer_norm_weight", name)
    if moe:
        return re.sub(r"\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", r".experts.\2.weight\1", name)
    return re.sub(r"\.pre_mlp_layernorm\.weight$", ".mlp.linear_fc1.layer_norm_weight", name)


def module_tree(shapes: dict[str, torch.Size]) -> torch.nn.Module:
    """Modules holding parameters of these names and shapes; `layers.<i>` carry their layer number."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for parent, part in zip([""] + path, path):
            if not hasattr(module, part):
                child = torch.nn.Module()
                if parent == "layers":
                    child.layer_number = int(part) + 1
                module.add_module(part, child)
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape)))
    return root


def local_parameter_shapes_worker(rank, world, name):
    from megatron_simreg import parallel
    from megatron_simreg.megatron_adagc import parameter_names
    from megatron_simreg.model import model_provider

    cfg = load_config(f"configs/{name}.yaml", BASE)
    parallel.initialize(cfg)
    try:
        model = model_provider(cfg)
        return {name: param.shape for param, name in parameter_names([model]).items()}, dict(
            (name, param.shape) for name, param in model.named_parameters())
    finally:
        parallel.destroy()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_adagc_names_tensors_alike_on_transformer_engine_and_local_layers(name):
    """A model of TE's layers names every tensor as the local layers' model does (same name, same shape), so
    AdaGC's thresholds saved with either resume on the other."""
    from megatron_simreg.megatron_adagc import parameter_names

    adagc_names, module_names = run_distributed(local_parameter_shapes_worker, 1, name)[0]
    te_names = {transformer_engine_name(key, moe=name == "tiny-mixtral"): shape for key, shape in module_names.items()}
    assert len(set(te_names) - set(module_names)) >= 2  # the norms (and experts) are named otherwise by TE
    on_te = {name: param.shape for param, name in parameter_names([module_tree(te_names)]).items()}
    assert on_te == adagc_names
