"""The model provider under megatron.training's contract: the TransformerConfig Megatron builds from our
arguments describes the same model as `transformer_config_from`, and the provider, called the way
megatron.training 0.19 calls it, builds the model from that config."""

import sys

import pytest
from distributed import run_distributed

from megatron_simreg.config import load_config

# Every TransformerConfig field that changes the model's parameters or its forward result.
MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma", "qk_layernorm", "gated_linear_unit",
    "activation_func", "add_bias_linear", "add_qkv_bias", "hidden_dropout", "attention_dropout", "init_method_std",
    "apply_residual_connection_post_layernorm", "fp32_residual_connection", "bf16", "fp16", "params_dtype",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "expert_model_parallel_size", "sequence_parallel", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_aux_loss_coeff", "moe_router_load_balancing_type", "moe_token_dispatcher_type", "moe_router_pre_softmax",
    "moe_router_score_function", "moe_shared_expert_intermediate_size",
)
LAYOUTS = {
    "tiny-llama bf16": ("tiny-llama", ["training.precision=bf16"], 1),
    "tiny-llama TP=2 + SP": ("tiny-llama", ["parallel.tensor=2", "parallel.sequence_parallel=true"], 2),
    "tiny-mixtral EP=2": ("tiny-mixtral", ["parallel.expert=2"], 2),
}


def megatron_config(cfg, world_size, monkeypatch):
    """The TransformerConfig megatron.training derives from `megatron_arguments(cfg)` on `world_size` GPUs."""
    from megatron.training import arguments
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_simreg.megatron_entry import megatron_arguments
    from megatron_simreg.run_plan import plan_run

    # Without Transformer Engine (here) the arguments turn Megatron's two TE fusions off; validate_args asks for
    # an H100's architecture when tensor parallelism is on.
    argv = ["pretrain", *megatron_arguments(cfg, plan_run(cfg, world_size), transformer_engine=False)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # as scripts/launch.sh sets it
    args = arguments.parse_args()
    args.world_size, args.rank = world_size, 0
    arguments.validate_args(args)
    return core_transformer_config_from_args(args)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_derives_the_same_model_from_our_arguments(layout, monkeypatch):
    from megatron_simreg.model import transformer_config_from

    name, overrides, world = LAYOUTS[layout]
    cfg = load_config(f"configs/{name}.yaml", overrides)
    ours, theirs = transformer_config_from(cfg), megatron_config(cfg, world, monkeypatch)
    for field in MODEL_FIELDS:
        assert getattr(theirs, field) == getattr(ours, field), field


def build_both_ways(rank, world, name, megatron_transformer_config):
    """Parameter names and shapes of the provider's model: from our config, and as megatron.training calls it."""
    from functools import partial

    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_simreg import parallel
    from megatron_simreg.model import model_provider

    cfg = load_config(f"configs/{name}.yaml", ["model.seq_length=32"])
    parallel.initialize(cfg)
    try:
        ours = model_provider(cfg)
        provider = partial(model_provider, cfg)  # what megatron_entry hands to pretrain()
        theirs = provider(pre_process=True, post_process=True, config=megatron_transformer_config,
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        assert theirs.config is megatron_transformer_config
        return [{n: tuple(p.shape) for n, p in model.named_parameters()} for model in (ours, theirs)]
    finally:
        parallel.destroy()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_provider_builds_the_same_model_from_megatrons_config(name, monkeypatch):
    cfg = load_config(f"configs/{name}.yaml", ["model.seq_length=32"])
    ours, theirs = run_distributed(build_both_ways, 1, name, megatron_config(cfg, 1, monkeypatch))[0]
    assert ours == theirs
    assert not any(n.endswith(".bias") for n in ours)  # no biases anywhere
    assert "output_layer.weight" in ours  # untied from the embedding
