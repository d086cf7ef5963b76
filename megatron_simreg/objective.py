"""The training objective inside Megatron's GPT: cross-entropy, untouched, plus lambda * SimReg.

SimReg reads the final hidden states through `GPTModel.forward(..., output_processor=...)`: the processor
runs Megatron's own output layer and `compute_language_model_loss` (so cross-entropy is exactly
Megatron's) and computes SimReg beside it on the hidden states it was handed (`[s, b, h]`, a slice of the
sequence under sequence or context parallelism). `loss_func` follows Megatron-LM's contract
(`loss_sum, num_tokens, report`) and adds SimReg as a sum over sequences weighted by their tokens, so
micro-batches, gradient accumulation and data parallelism scale it exactly as they scale the cross-entropy.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_simreg.simreg import SimRegOutput, simreg_loss

REPORTED_STATS = ("simreg", "simreg lsr", "simreg live anchors", "simreg negative angle")


@dataclass(frozen=True)
class SimRegObjective:
    """SimReg's settings as the step needs them (from the config's `simreg` section).

    weight: lambda, already resolved (0 computes and logs SimReg without training on it).
    mode: "full" (pairs across the whole sequence; gathers embeddings under SP/CP) or "chunk".
    chunk_size: chunk-wise only; None means the rank's own slice under SP/CP (no communication),
        the whole sequence otherwise.
    layer: -1 for the final hidden states after the final norm, else a decoder layer's output (0-based),
        the paper's Sec. 5.3 ablation.
    """

    enabled: bool = True
    weight: float = 10.0
    temperature: float = 0.01
    mode: str = "full"
    chunk_size: int | None = None
    reduction: str = "group"
    layer: int = -1
    block_size: int = 512

    @classmethod
    def from_config(cls, cfg) -> "SimRegObjective":
        """From a `megatron_simreg.config.Config`, lambda resolved."""
        s = cfg.simreg
        return cls(
            enabled=s.enabled, weight=cfg.simreg_weight, temperature=s.temperature, mode=s.mode,
            chunk_size=s.chunk_size, reduction=s.reduction, layer=s.layer, block_size=s.block_size,
        )

    def __post_init__(self):
        if self.mode not in ("full", "chunk"):
            raise ValueError(f"simreg.mode must be 'full' or 'chunk', got {self.mode!r}")
        if self.mode == "full" and self.chunk_size is not None:
            raise ValueError("simreg.chunk_size is set but simreg.mode is 'full': set simreg.mode=chunk or chunk_size=null")

    def output_processor(self, *, hidden_states, output_layer, output_weight, labels, loss_mask, runtime_gather_output,
                         context, scale_logits, compute_language_model_loss, config, **_):
        """Megatron's logits and per-token cross-entropy, and SimReg on the hidden states (into `context`)."""
        logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        logits = scale_logits(logits)
        if labels is None:  # inference: logits as GPTModel returns them
            return logits.transpose(0, 1).contiguous()
        cross_entropy = compute_language_model_loss(labels, logits)
        if self.enabled:
            simreg_hidden = hidden_states if self.layer < 0 else context.pop("layer_output")
            context["simreg"] = self.simreg(simreg_hidden, labels, loss_mask, config.sequence_parallel)
        return cross_entropy

    def simreg(self, hidden_states, labels, loss_mask, sequence_parallel: bool) -> SimRegOutput:
        """SimReg on this rank's slice `[s_local, b, h]` of the sequences whose labels are `[b, s]`."""
        group, layout, position = _sequence_sharding(sequence_parallel)
        local = hidden_states.shape[0]
        positions = slice(position * local, (position + 1) * local)
        if self.mode == "full":
            chunk_size = None
        else:
            chunk_size = "local" if self.chunk_size is None else self.chunk_size
        return simreg_loss(
            hidden_states,
            labels[:, positions],
            None if loss_mask is None else loss_mask[:, positions],
            temperature=self.temperature,
            chunk_size=chunk_size,
            reduction=self.reduction,
            sequence_first=True,
            process_group=group,
            sequence_layout=layout,
            block_size=self.block_size,
        )


def _sequence_sharding(sequence_parallel: bool):
    """(group holding pieces of the same sequences, layout of the local piece, its index in labels).

    Sequence parallelism splits the (context-parallel-local) sequence contiguously over the tensor
    group; context parallelism hands each rank two zigzag chunks, with labels already local.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    sequence_parallel = sequence_parallel and tp > 1
    if not sequence_parallel and cp == 1:
        return None, "contiguous", 0
    if not sequence_parallel:
        return parallel_state.get_context_parallel_group(), "zigzag", 0
    position = parallel_state.get_tensor_model_parallel_rank()
    if cp == 1:
        return parallel_state.get_tensor_model_parallel_group(), "contiguous", position
    return parallel_state.get_tensor_and_context_parallel_group(), "contiguous", position


def loss_func(objective: SimRegObjective, loss_mask: torch.Tensor, context: dict, output_tensor: torch.Tensor):
    """Megatron-LM's contract: (loss sum over tokens, number of tokens, report of [sum, count] pairs).

    SimReg enters as lambda * sum_seq S_seq * T_seq (`SimRegOutput.token_weighted_sum`), a sum over sequences
    like the cross-entropy's sum over tokens, so Megatron's division by tokens, micro-batches and data-parallel
    ranks treats both alike and the objective does not depend on how the global batch is cut. Under context
    parallelism the sequences' tokens are spread over the group: each rank's value carries its own share of
    the tokens, while its gradient share (which sums to the whole over the group) keeps full weight, so after
    Megatron averages over the group the gradient is lambda * d(sum_seq S_seq * T_seq) per token, as for one
    process.
    """
    losses = output_tensor.view(-1).float()
    mask = loss_mask.reshape(-1).float()
    cross_entropy = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    loss = cross_entropy
    report = {"lm loss": torch.stack([cross_entropy.detach(), num_tokens.float()])}
    out: SimRegOutput | None = context.get("simreg")
    if out is not None:
        tokens = num_tokens.float()
        weighted = out.token_weighted_sum
        share = tokens / out.tokens.clamp_min(1.0)  # 1 unless context parallelism spreads the tokens
        loss = loss + objective.weight * (weighted + (weighted.detach() * share - weighted.detach()))
        for name, value in zip(REPORTED_STATS, (out.loss, out.lsr_mean, out.live_fraction, out.negative_angle)):
            report[name] = torch.stack([value.detach().float() * tokens, tokens])
    return loss, num_tokens, report


def forward_step(objective: SimRegObjective, batch_fn, data_iterator, model):
    """Megatron-LM's forward step: run the model with the SimReg output processor, return the loss function.

    `batch_fn(data_iterator)` gives this rank's batch: tokens, labels, loss_mask, position_ids, attention_mask.
    """
    batch = batch_fn(data_iterator)
    context: dict = {}
    kwargs = {}
    if objective.enabled:
        kwargs = dict(output_processor=objective.output_processor, output_processor_context=context)
    with _capture_layer_output(model, objective, context):
        output = model(
            batch["tokens"],
            batch["position_ids"],
            batch.get("attention_mask"),
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            **kwargs,
        )
    return output, partial(loss_func, objective, batch["loss_mask"], context)


@contextlib.contextmanager
def _capture_layer_output(model, objective: SimRegObjective, context: dict):
    """For `simreg.layer >= 0`: hand that decoder layer's output to the output processor."""
    if not objective.enabled or objective.layer < 0:
        yield
        return
    layer = _decoder_layer(model, objective.layer)
    handle = layer.register_forward_hook(lambda _module, _inputs, output: context.__setitem__("layer_output", output[0]))
    try:
        yield
    finally:
        handle.remove()


def _decoder_layer(model, index: int):
    """The decoder layer with 0-based global index `index`, which must live on this (last) pipeline stage."""
    while not hasattr(model, "decoder"):  # DDP and Float16Module wrap the GPTModel as .module
        model = model.module
    for layer in model.decoder.layers:
        if layer.layer_number == index + 1:
            return layer
    held = [layer.layer_number - 1 for layer in model.decoder.layers]
    raise ValueError(
        f"simreg.layer={index} is not on this pipeline stage (it holds layers {held[0]}..{held[-1]}); "
        "SimReg runs on the last stage: choose one of its layers or -1 for the final hidden states"
    )


def reduce_reports(reports: list[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """Average each reported [sum, count] pair over micro-batches and the data-parallel group, as Megatron does."""
    reduced = {}
    for name in reports[0]:
        total = torch.stack([report[name].float() for report in reports]).sum(0)
        if group is not None:
            dist.all_reduce(total, group=group)
        reduced[name] = (total[0] / total[1].clamp_min(1)).item() if total[1] > 0 else math.nan
    return reduced
