"""LLaMA / Mixtral models from a config, as megatron-core GPTModels.

`model_provider(cfg, pre_process, post_process, vp_stage, config)` builds the model both loops train: the
local loop passes no TransformerConfig (it is derived from our config by `transformer_config_from`), while
megatron.training's provider (megatron_entry) passes the one Megatron derives from its arguments, with the
GPU fusions and any flag given in `megatron.extra_args`. The config's `transformer_impl` picks the layers:
Transformer Engine's (GPUs with TE, as in NGC images) or megatron-core's local modules, with an RMSNorm
that accepts sequence parallelism. Local layers read checkpoints written with TE layers and the other way
round: their sharded keys are the same.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_simreg import regularizers
from megatron_simreg.config import Config
from megatron_simreg.objective import check_layer_capture
from megatron_simreg.run_plan import padded_vocab_size


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built as Megatron builds its norms, usable under sequence parallelism.

    Under sequence parallelism each rank normalises its own slice of the sequence, so the weight's
    gradient is partial: marking it `sequence_parallel` makes Megatron all-reduce it over the tensor group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def have_transformer_engine() -> bool:
    """Whether this node can run Transformer Engine's layers: CUDA and the package."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config_from(cfg: Config) -> TransformerConfig:
    """The TransformerConfig of the local loop (and export): field for field the one megatron.training derives
    from `megatron_arguments(cfg, ..., transformer_engine=False)` (tested), so both loops compute alike."""
    m, p = cfg.model, cfg.parallel
    bf16 = cfg.training.precision == "bf16"
    moe = {}
    if m.num_experts:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type=p.moe_token_dispatcher,
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        sequence_parallel=p.sequence_parallel and p.tensor > 1,
        use_cpu_initialization=not torch.cuda.is_available(),
        transformer_impl="transformer_engine" if have_transformer_engine() else "local",
        # Megatron's defaults for what its arguments leave unset (jit-fused SwiGLU and residual add, softmax in
        # fp32 as megatron_arguments asks for, pipeline outputs freed after sending, p2p context parallelism)
        attention_softmax_in_fp32=True,
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        persist_layer_norm=True,
        deallocate_pipeline_outputs=True,
        cp_comm_type="p2p",
        tensor_parallel_num_weight_shards=p.tensor,
        expert_tensor_parallel_num_weight_shards=p.tensor,
        inference_sampling_seed=cfg.training.seed,
        **moe,
    )


def block_spec(config: TransformerConfig, vp_stage: int | None = None):
    """The layers `config.transformer_impl` names: Transformer Engine's fused ones, or local megatron-core modules.

    The local spec's norms (and the final norm) are swapped for one that accepts sequence parallelism.
    """
    if config.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(
            config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    layer = copy.deepcopy(get_gpt_layer_local_spec(config.num_moe_experts, normalization="RMSNorm"))
    layer.submodules.input_layernorm = SequenceParallelRMSNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    layers = [layer] * get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=SequenceParallelRMSNorm)


def model_provider(
    cfg: Config,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: TransformerConfig | None = None,
    pg_collection=None,
) -> GPTModel:
    """A GPTModel for this pipeline stage (Megatron-LM's model-provider contract).

    `config`: the TransformerConfig to build from; None derives it from `cfg` (the local loop). megatron.training
    0.19 itself passes None (it calls `model_provider(pre_process=, post_process=, [vp_stage=,] config=None,
    pg_collection=)`), so megatron_entry's provider fills in the config Megatron derives from its arguments.
    """
    if config is None:
        config = transformer_config_from(cfg)
    build = partial(_gpt_model, cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                    pg_collection=pg_collection)
    model = build(config)
    if post_process and cfg.simreg.enabled:
        check_layer_capture(model, cfg.simreg.layer)
    state = regularizer_state(cfg, model, lambda: build(_fp32_twin(config))) if post_process else None
    if state is not None:  # in the model, so the optimizer steps it and both checkpoint formats keep it
        model.regularizer_state = state
    return model


def _gpt_model(cfg: Config, config: TransformerConfig, pre_process, post_process, vp_stage, pg_collection) -> GPTModel:
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, vp_stage),
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


def _fp32_twin(config: TransformerConfig) -> TransformerConfig:
    """`config` for a copy of the model with plain fp32 weights, copied in rather than initialised (SCE's momentum
    encoder: an EMA needs fp32 weights; the objective runs its forward in the model's precision). No fp8/fp4
    weights and no CUDA graphs: the EMA updates the weights in place and the forward runs outside the schedule."""
    twin = copy.copy(config)
    twin.bf16, twin.fp16, twin.params_dtype, twin.perform_initialization = False, False, torch.float32, False
    twin.fp8_param, twin.fp4_param = False, False
    twin.enable_cuda_graph, twin.external_cuda_graph, twin.cuda_graph_impl = False, False, "none"
    return twin


def regularizer_state(cfg: Config, model: GPTModel, twin) -> torch.nn.Module | None:
    """The trained baseline's state (CPretrain's learnable temperature, SCE's momentum encoder), or None."""
    r = cfg.regularizer
    regularizer = regularizers.get(r.name)
    if r.settings is None or not regularizer.state_names(r.settings):
        return None
    return regularizer.state(r.settings, model, twin)
