"""LLaMA / Mixtral models from a config, as megatron-core GPTModels.

`model_provider(cfg, pre_process, post_process, vp_stage)` is what Megatron-LM's `pretrain()` and our
CPU loop both call. Layer specs: Transformer Engine's on a GPU when it is installed (NGC images),
megatron-core's local modules otherwise, with an RMSNorm that accepts sequence parallelism.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_simreg import regularizers
from megatron_simreg.config import Config


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built as Megatron builds its norms, usable under sequence parallelism.

    Under sequence parallelism each rank normalises its own slice of the sequence, so the weight's
    gradient is partial: marking it `sequence_parallel` makes Megatron all-reduce it over the tensor group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def padded_vocab_size(cfg: Config) -> int:
    """The tokenizer's vocabulary padded so the embedding splits evenly over tensor-parallel ranks."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor
    return -(-cfg.model.vocab_size // multiple) * multiple


def transformer_config_from(cfg: Config) -> TransformerConfig:
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
        **moe,
    )


def block_spec(config: TransformerConfig, vp_stage: int | None = None):
    """Transformer Engine's fused layers on a GPU when available; local megatron-core modules otherwise.

    The local spec's norms (and the final norm) are swapped for one that accepts sequence parallelism.
    """
    if torch.cuda.is_available() and _have_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm)
    layer = copy.deepcopy(get_gpt_layer_local_spec(config.num_moe_experts, normalization="RMSNorm"))
    layer.submodules.input_layernorm = SequenceParallelRMSNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    layers = [layer] * get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=SequenceParallelRMSNorm)


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def model_provider(
    cfg: Config,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: TransformerConfig | None = None,
    pg_collection=None,
) -> GPTModel:
    """A GPTModel for this pipeline stage (Megatron-LM's model-provider contract).

    megatron.training 0.19 calls `model_provider(pre_process=, post_process=, [vp_stage=,] config=,
    pg_collection=)`, with the TransformerConfig it built from our arguments (the same model, plus its
    GPU fusions): that one is used when given. The CPU loop passes neither.
    """
    if config is None:
        config = transformer_config_from(cfg)
    model = GPTModel(
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
    state = regularizer_state(cfg, config) if post_process else None
    if state is not None:  # in the model, so the optimizer steps it and both checkpoint formats keep it
        model.regularizer_state = state
    return model


def regularizer_state(cfg: Config, config: TransformerConfig) -> torch.nn.Module | None:
    """The trained baseline's state (CPretrain's learnable temperature, SCE's EMA target), or None."""
    r = cfg.regularizer
    if r.settings is None:
        return None
    return regularizers.get(r.name).state(r.settings, config.hidden_size, config.params_dtype, config.sequence_parallel)
