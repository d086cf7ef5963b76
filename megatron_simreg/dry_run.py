"""Check a launch on CPU before it burns GPU hours.

`python -m megatron_simreg.train --config configs/llama2-7b.yaml --dry-run --world-size 64` resolves the
config, checks the parallel layout against the GPUs, and prints the parameter count (total and active for
MoE), the memory each GPU needs (weights, gradients, optimizer state with and without the distributed
optimizer, activations at the micro-batch size), tokens and FLOPs per step, the exact launch command
(megatron_simreg.launch, with torchrun's arguments) and Megatron arguments. An impossible layout raises
ConfigError with the reason.

The estimates are the usual closed forms: bf16 weights (2 bytes), fp32 gradient buffers (4 bytes), fp32
main weights plus Adam moments (12 bytes, divided over data-parallel ranks by the distributed optimizer);
activations from Korthikanti et al. (2022) with flash attention, 34 bytes per token and hidden unit per
layer (split over tensor ranks under sequence parallelism), plus fp32 logits on the last stage; FLOPs as
6 x active parameters + 6 x layers x hidden x sequence (causal attention) per token, plus SimReg's pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_simreg.config import Config
from megatron_simreg.run_plan import padded_vocab_size, plan_run

GIB = 2**30


@dataclass
class ParameterCount:
    total: int
    active: int  # per token: all of a dense model, top-k experts of an MoE
    expert: int  # parameters inside experts (sharded over expert-parallel ranks)


def parameter_count(cfg: Config) -> ParameterCount:
    m = cfg.model
    h, vocab = m.hidden_size, padded_vocab_size(cfg)
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    attention = h * (h + 2 * kv) + h * h + 2 * h  # qkv, output projection, two norms
    if m.num_experts:
        ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
        expert = 3 * h * ffn  # SwiGLU: gate and up (2 * h * ffn), down (h * ffn)
        per_layer_total = attention + h * m.num_experts + m.num_experts * expert
        per_layer_active = attention + h * m.num_experts + m.moe_router_topk * expert
        experts = m.num_layers * m.num_experts * expert
    else:
        per_layer_total = per_layer_active = attention + 3 * h * m.ffn_hidden_size
        experts = 0
    embeddings = vocab * h * (2 if m.untie_embeddings_and_output_weights else 1) + h  # + final norm
    return ParameterCount(
        total=embeddings + m.num_layers * per_layer_total,
        active=embeddings + m.num_layers * per_layer_active,
        expert=experts,
    )


def memory_per_gpu(cfg: Config, data_parallel: int) -> dict[str, float]:
    """Bytes on the busiest GPU (first pipeline stage, which holds the most in-flight activations)."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    counts = parameter_count(cfg)
    dense = (counts.total - counts.expert) / (p.tensor * p.pipeline)
    experts = counts.expert / (p.expert * p.pipeline)
    weight_bytes = 2 if t.precision == "bf16" else 4
    expert_data_parallel = max(data_parallel * p.context // p.expert, 1)
    optimizer = 12 * (dense + experts)
    tokens = t.micro_batch_size * m.seq_length / p.context
    per_layer = 34 * tokens * m.hidden_size / (p.tensor if p.sequence_parallel else 1)
    logits = 4 * tokens * padded_vocab_size(cfg) / p.tensor
    in_flight = p.pipeline  # 1F1B: the first stage holds this many micro-batches
    return {
        "weights": weight_bytes * (dense + experts),
        "gradients": 4 * (dense + experts),
        "optimizer": optimizer,
        "optimizer (distributed)": 12 * (dense / data_parallel + experts / expert_data_parallel),
        "activations": per_layer * (m.num_layers / p.pipeline) * in_flight + (logits if p.pipeline == 1 else 0),
    }


def flops_per_step(cfg: Config) -> float:
    m, t = cfg.model, cfg.training
    tokens = t.global_batch_size * m.seq_length
    per_token = 6 * parameter_count(cfg).active + 6 * m.num_layers * m.hidden_size * m.seq_length
    if cfg.simreg.enabled:
        pairs = m.seq_length if cfg.simreg.mode == "full" or not cfg.simreg.chunk_size else cfg.simreg.chunk_size
        per_token += 6 * m.hidden_size * pairs
    return per_token * tokens


def report(cfg: Config, world_size: int, gpus_per_node: int = 8, gpu_memory_gib: float = 80.0) -> str:
    """The dry-run report; raises ConfigError when the layout cannot run on `world_size` GPUs."""
    from megatron_simreg.megatron_entry import megatron_arguments

    plan = plan_run(cfg, world_size)
    data_parallel = plan.data_parallel
    p, t = cfg.parallel, cfg.training
    counts = parameter_count(cfg)
    memory = memory_per_gpu(cfg, data_parallel)
    micro = plan.micro_batches
    fixed = memory["weights"] + memory["gradients"] + memory["activations"]
    with_optimizer = fixed + memory["optimizer (distributed)" if p.distributed_optimizer else "optimizer"]
    nodes = max(1, math.ceil(world_size / gpus_per_node))
    lines = [
        f"config {cfg.name}: {world_size} GPUs ({nodes} node(s) x {min(world_size, gpus_per_node)})",
        f"layout: tensor {p.tensor} x pipeline {p.pipeline} x context {p.context} x data {data_parallel}"
        f" (expert {p.expert}), sequence parallel {p.sequence_parallel and p.tensor > 1},"
        f" distributed optimizer {p.distributed_optimizer}, {micro} micro-batches of {t.micro_batch_size} per step",
        f"parameters: {counts.total / 1e9:.3f}B total, {counts.active / 1e9:.3f}B active per token",
        "memory per GPU (GiB): " + ", ".join(f"{name} {value / GIB:.2f}" for name, value in memory.items()),
        f"  total with the {'distributed ' if p.distributed_optimizer else ''}optimizer: {with_optimizer / GIB:.2f} GiB"
        f" of {gpu_memory_gib:.0f}" + ("" if with_optimizer / GIB <= gpu_memory_gib else "  <-- does not fit"),
        f"tokens per step: {plan.tokens_per_iter:,}; FLOPs per step: {flops_per_step(cfg):.3e};"
        f" {plan.train_iters:,} steps, {plan.train_samples * cfg.model.seq_length / 1e9:.1f}B tokens",
        *([plan.batch_size_change] if plan.batch_size_change else []),
        f"tokenizer: {plan.tokenizer_path} ({plan.vocab_size:,} tokens;"
        f" embedding padded to {plan.padded_vocab_size:,})",
        f"SimReg: lambda {cfg.regularizer_weight if cfg.regularizer.name == 'simreg' else 0:g}, "
        f"tau {cfg.simreg.temperature}, {cfg.simreg.mode}"
        + (f" (chunk {cfg.simreg.chunk_size or 'local slice'})" if cfg.simreg.mode == "chunk" else ""),
        *([f"regularizer: {cfg.regularizer.name}, weight {cfg.regularizer_weight:g}, {cfg.regularizer.settings}"]
          if cfg.regularizer.name != "simreg" else []),
        "",
        "launch command (per node; torchrun's arguments, and the exit code 143 of a run stopped by SIGTERM):",
        f"  python -m megatron_simreg.launch --nnodes {nodes} --nproc-per-node {min(world_size, gpus_per_node)} "
        f"--node-rank $NODE_RANK --master-addr $MASTER_ADDR --master-port $MASTER_PORT "
        "-m megatron_simreg.train --config CONFIG",
        "Megatron arguments (a GPU node with Transformer Engine):",
        "  " + " ".join(megatron_arguments(cfg, plan, transformer_engine=True)),
    ]
    return "\n".join(lines)
