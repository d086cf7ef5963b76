"""The training objective inside Megatron's GPT: cross-entropy, untouched, plus lambda * SimReg (or a baseline).

SimReg reads the final hidden states through `GPTModel.forward(..., output_processor=...)`: the processor
runs Megatron's own output layer and `compute_language_model_loss` (so cross-entropy is exactly
Megatron's) and computes SimReg beside it on the hidden states it was handed (`[s, b, h]`, a slice of the
sequence under sequence or context parallelism). `loss_func` follows Megatron-LM's contract
(`loss_sum, num_tokens, report`) and adds SimReg as a sum over sequences weighted by their tokens, so
micro-batches, gradient accumulation and data parallelism scale it exactly as they scale the cross-entropy.
A Table 1 baseline (`regularizer.name`, megatron_simreg.regularizers) enters the same way instead of SimReg,
which then runs at weight 0 so its statistics stay logged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from megatron_simreg import regularizers
from megatron_simreg.regularizers import RegularizerInputs, RegularizerOutput
from megatron_simreg.simreg import SimRegOutput, simreg_loss

REPORTED_STATS = ("simreg", "simreg lsr", "simreg live anchors", "simreg negative angle")


@dataclass(frozen=True)
class Baseline:
    """A Table 1 regularizer trained instead of SimReg: its registered name, weight and settings."""

    name: str
    weight: float
    settings: object

    @property
    def regularizer(self) -> regularizers.Regularizer:
        return regularizers.get(self.name)

    @property
    def needs(self) -> frozenset:
        return self.regularizer.needs(self.settings)


@dataclass(frozen=True)
class SimRegObjective:
    """SimReg's settings as the step needs them (from the config's `simreg` section).

    weight: lambda, already resolved (0 computes and logs SimReg without training on it: from detached hidden
        states, so SimReg's backward, and under SP/CP its collectives there, never run).
    mode: "full" (pairs across the whole sequence; gathers embeddings under SP/CP) or "chunk".
    chunk_size: chunk-wise only; None means the rank's own slice under SP/CP (no communication),
        the whole sequence otherwise.
    layer: -1 for the final hidden states after the final norm, else a decoder layer's output (0-based),
        the paper's Sec. 5.3 ablation.
    kernel: the pairwise kernel, "auto" (the fused Triton kernel for CUDA tensors when triton imports, else
        PyTorch's), "torch" or "triton".
    deterministic: the same gradient bits on every run (the Triton backward without atomics); also on under
        torch's deterministic algorithms, which Megatron's --deterministic-mode turns on.
    baseline: a Table 1 regularizer trained instead (on the final hidden states); SimReg's weight is then 0.
    """

    enabled: bool = True
    weight: float = 10.0
    temperature: float = 0.01
    mode: str = "full"
    chunk_size: int | None = None
    reduction: str = "group"
    layer: int = -1
    block_size: int = 512
    kernel: str = "auto"
    deterministic: bool = False
    baseline: Baseline | None = None

    @classmethod
    def from_config(cls, cfg) -> "SimRegObjective":
        """From a `megatron_simreg.config.Config`, lambda resolved."""
        s, r = cfg.simreg, cfg.regularizer
        baseline = None if r.name == "simreg" else Baseline(r.name, cfg.regularizer_weight, r.settings)
        return cls(
            enabled=s.enabled, weight=cfg.regularizer_weight if baseline is None else 0.0, temperature=s.temperature,
            mode=s.mode, chunk_size=s.chunk_size, reduction=s.reduction, layer=s.layer, block_size=s.block_size,
            kernel=s.kernel, deterministic=s.deterministic, baseline=baseline,
        )

    def __post_init__(self):
        if self.mode not in ("full", "chunk"):
            raise ValueError(f"simreg.mode must be 'full' or 'chunk', got {self.mode!r}")
        if self.mode == "full" and self.chunk_size is not None:
            raise ValueError(
                "simreg.chunk_size is set but simreg.mode is 'full': set simreg.mode=chunk or chunk_size=null"
            )

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
        if self.baseline is not None:
            inputs = self.baseline_inputs(hidden_states, labels, loss_mask, context, config, output_layer,
                                          output_weight, runtime_gather_output, scale_logits)
            # Dropout views of a sequence-parallel slice draw from the tensor-parallel rank's own RNG, as
            # Megatron's dropout in sequence-parallel regions does; replicated states share one (equal masks).
            sliced = config.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1
            with tensor_parallel.get_cuda_rng_tracker().fork() if sliced else contextlib.nullcontext():
                context["regularizer"] = self.baseline.regularizer.compute(inputs, self.baseline.settings,
                                                                           context.get("regularizer_state"))
        return cross_entropy

    def simreg(self, hidden_states, labels, loss_mask, sequence_parallel: bool) -> SimRegOutput:
        """SimReg on this rank's slice `[s_local, b, h]` of the sequences whose labels are `[b, s]`."""
        group, layout, position = _sequence_sharding(sequence_parallel)
        local = hidden_states.shape[0]
        positions = slice(position * local, (position + 1) * local)
        return self.loss(hidden_states, labels[:, positions], None if loss_mask is None else loss_mask[:, positions],
                         sequence_first=True, process_group=group, sequence_layout=layout)

    def loss(self, hidden_states, labels, loss_mask, **layout) -> SimRegOutput:
        """`simreg_loss` with these settings; `layout`: its `sequence_first`, `process_group`, `sequence_layout`
        (megatron_simreg.hf calls it with none: batch-first states, one process per sequence). At lambda 0 the
        states are detached: SimReg is logged, not trained on, so none of its backward runs."""
        hidden_states = hidden_states if self.weight else hidden_states.detach()
        if self.mode == "full":
            chunk_size = None
        else:
            chunk_size = "local" if self.chunk_size is None else self.chunk_size
        return simreg_loss(
            hidden_states, labels, loss_mask, temperature=self.temperature, chunk_size=chunk_size,
            reduction=self.reduction, block_size=self.block_size, kernel=self.kernel,
            deterministic=self.deterministic, **layout,
        )

    def baseline_inputs(self, hidden_states, labels, loss_mask, context, config, output_layer, output_weight,
                        runtime_gather_output, scale_logits) -> RegularizerInputs:
        """What the baseline reads: this rank's slice of the final states and labels, and on demand the labels'
        output-layer rows, the output layer's (vocabulary-parallel) logits, the second forward's states and the
        momentum encoder's (both run by `forward_step`)."""
        group, layout, position = _sequence_sharding(config.sequence_parallel)
        local = hidden_states.shape[0]
        positions = slice(position * local, (position + 1) * local)
        needs, weight = self.baseline.needs, output_layer.weight if output_weight is None else output_weight
        tensor_group = parallel_state.get_tensor_model_parallel_group()
        gathered = runtime_gather_output or output_layer.gather_output
        split_vocabulary = dist.get_world_size(tensor_group) > 1 and not gathered

        def logits(view):
            out, _ = output_layer(view, weight=output_weight, runtime_gather_output=runtime_gather_output)
            return scale_logits(out)

        cp = parallel_state.get_context_parallel_world_size()
        return RegularizerInputs(
            hidden=hidden_states, labels=labels[:, positions],
            loss_mask=None if loss_mask is None else loss_mask[:, positions],
            sequence_group=group, sequence_layout=layout,
            label_embeddings=(partial(_label_embeddings, weight, labels, config.sequence_parallel)
                              if "label_embeddings" in needs else None),
            logits=logits if "logits" in needs else None, logit_mask=loss_mask,
            logit_group=parallel_state.get_context_parallel_group() if cp > 1 else None,
            vocab_group=tensor_group if split_vocabulary else None,
            # in evaluation (no dropout in the layers) a second forward would repeat the first
            second_view=context.get("second_view", hidden_states) if "second_view" in needs else None,
            target_view=context.get("target_view"), training=context.get("training", True),
        )


def _label_embeddings(weight: torch.Tensor, labels: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """`[s_local, b, h]`: the output layer's row of each next-token label. The vocabulary is split over the
    tensor-parallel ranks: each looks up the labels in its range, and the ranks' rows are summed (and cut along
    the sequence under sequence parallelism), differentiably, as megatron-core's vocabulary-parallel embedding."""
    rows = weight.shape[0]
    local = labels - parallel_state.get_tensor_model_parallel_rank() * rows
    inside = ((local >= 0) & (local < rows)).to(weight.dtype)
    found = (F.embedding(local.clamp(0, rows - 1), weight) * inside[..., None]).transpose(0, 1).contiguous()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return found
    if sequence_parallel:
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(found)
    return tensor_parallel.reduce_from_tensor_model_parallel_region(found)


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
    terms: list[tuple[float, RegularizerOutput]] = []
    out: SimRegOutput | None = context.get("simreg")
    if out is not None:
        stats = dict(zip(REPORTED_STATS, (out.loss, out.lsr_mean, out.live_fraction, out.negative_angle)))
        terms.append((objective.weight, RegularizerOutput(out.loss, out.token_weighted_sum, out.tokens, stats)))
    if context.get("regularizer") is not None:
        terms.append((objective.baseline.weight, context["regularizer"]))
    tokens = num_tokens.float()
    spread = parallel_state.get_context_parallel_world_size() > 1
    for weight, term in terms:
        weighted = term.token_weighted_sum
        if spread:  # this rank's share of the sequences' tokens
            share = tokens / term.tokens.clamp_min(1.0)
            weighted = weighted + (weighted.detach() * share - weighted.detach())
        loss = loss + weight * weighted
        if term.stats:  # each statistic as Megatron reports a mean: [value * tokens, tokens]
            values = torch.stack(list(term.stats.values())).detach().float()
            report.update(zip(term.stats, torch.stack([values * tokens, tokens.expand_as(values)], dim=-1)))
    return loss, num_tokens, report


def forward_step(objective: SimRegObjective, batch_fn, data_iterator, model):
    """Megatron-LM's forward step: run the model with the SimReg output processor, return the loss function.

    `batch_fn(data_iterator)` gives this rank's batch: tokens, labels, loss_mask, position_ids, attention_mask.
    """
    batch = batch_fn(data_iterator)
    context: dict = {}
    kwargs = {}
    if objective.enabled or objective.baseline is not None:
        kwargs = dict(output_processor=objective.output_processor, output_processor_context=context)
    _baseline_inputs(model, objective, batch, context)
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
    """For `simreg.layer >= 0`: hand that decoder layer's output to the output processor (last stage only, where
    SimReg runs; `check_layout` made sure the layer lives there).

    megatron-core's decoder extracts it (`extract_layer_indices`), so it stays in the autograd graph under full
    activation recompute too, where the layers run without autograd and only a recompute chunk's output is kept
    (`check_layer_capture` refuses a chunk that ends past the layer). A hook on the layer itself would see a
    tensor without gradient there, and lambda would train nothing.
    """
    module = _gpt_model(model)
    if not objective.enabled or objective.layer < 0 or not module.post_process:
        yield
        return

    def extract(_decoder, args, kwargs):
        return args, {**kwargs, "extract_layer_indices": {objective.layer}}

    def keep(_decoder, _args, _kwargs, output):
        hidden_states, (context["layer_output"],) = output
        return hidden_states

    handles = [module.decoder.register_forward_pre_hook(extract, with_kwargs=True),
               module.decoder.register_forward_hook(keep, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_layer_capture(model, layer: int) -> None:
    """Refuse, before training, a full activation recompute that keeps no output of decoder layer `layer`
    (`simreg.layer`) of this model chunk in the autograd graph: a uniform recompute chunk that ends past it, or
    `--distribute-saved-activations`, which cuts each chunk's input (the previous chunk's output) in place."""
    config, layers = model.config, [block.layer_number - 1 for block in model.decoder.layers]
    if layer not in layers or config.recompute_granularity != "full":
        return
    if config.distribute_saved_activations:
        raise ValueError(f"simreg.layer={layer} needs that layer's output whole, which --distribute-saved-activations "
                         "cuts under full recompute: drop that flag, or recompute selectively "
                         "(--recompute-activations)")
    chunk, index = config.recompute_num_layers, layers.index(layer)
    if config.recompute_method == "uniform" and (index + 1) % chunk and index != len(layers) - 1:
        raise ValueError(
            f"simreg.layer={layer} is recomputed inside a chunk of {chunk} layers (--recompute-method uniform "
            f"--recompute-num-layers {chunk}), whose output alone keeps its gradient: choose a layer that ends a "
            "chunk, --recompute-num-layers 1, --recompute-method block, or --recompute-activations"
        )


def _gpt_model(model):
    while not hasattr(model, "decoder"):  # DDP and Float16Module wrap the GPTModel as .module
        model = model.module
    return model


def _baseline_inputs(model, objective: SimRegObjective, batch: dict, context: dict) -> None:
    """Into `context`, what a baseline reads besides the final states: its state module in the model, whether the
    model is in training (evaluation drops nothing out), the final states of a second forward with dropout (views:
    forward, training only) and of SCE's momentum encoder (without gradient)."""
    if objective.baseline is not None:
        gpt = _gpt_model(model)
        state, needs = getattr(gpt, "regularizer_state", None), objective.baseline.needs
        context.update(regularizer_state=state, training=gpt.training)
        if "second_view" in needs and gpt.training:
            with _dropout(gpt, objective.baseline.settings.dropout):
                context["second_view"] = _final_states(model, batch)
        if "target_view" in needs:
            with torch.no_grad(), _in_precision_of(gpt, batch["tokens"].device):
                context["target_view"] = _final_states(state.encoder, batch)


def _in_precision_of(gpt, device: torch.device):
    """Autocast to the model's bf16/fp16 (nothing for fp32): the fp32 momentum encoder then computes as the model
    does, and Transformer Engine's fused and flash attention, which take only bf16/fp16, can run it."""
    dtype = torch.bfloat16 if gpt.config.bf16 else torch.float16 if gpt.config.fp16 else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _final_states(model, batch: dict) -> torch.Tensor:
    """Final hidden states `[s, b, h]` (after the final norm) of a forward of `model` on the batch."""
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                 loss_mask=batch["loss_mask"], output_processor=lambda hidden_states, **_: hidden_states)


@contextlib.contextmanager
def _dropout(gpt, p: float):
    """Dropout p wherever megatron-core's `hidden_dropout` and `attention_dropout` put it (the embedding's output,
    each layer's attention probabilities and residual branches), as BERT's dropout in SimCSE; restored on leaving.
    The layers read `hidden_dropout` at each forward, the embedding and the local attention apply
    `torch.nn.Dropout` modules, Transformer Engine's attention keeps its probability as a float
    `attention_dropout`. Bitwise as layers built with both dropouts p (tested)."""
    parts = [part for part in (getattr(gpt, "embedding", None), gpt.decoder) if part is not None]
    saved = []
    for module in (module for part in parts for module in part.modules()):
        if isinstance(module, torch.nn.Dropout):
            saved.append((module, "p", module.p))
        for name in ("hidden_dropout", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                saved.append((module, name, getattr(module, name)))
    for owner, name, _ in saved:
        setattr(owner, name, p)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _regularizer_states(model_chunks) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(GPTModel, its baseline state) of each model chunk that holds one."""
    chunks = [_gpt_model(chunk) for chunk in model_chunks]
    return [(gpt, gpt.regularizer_state) for gpt in chunks if getattr(gpt, "regularizer_state", None) is not None]


def update_regularizer_state(model_chunks) -> None:
    """After each optimizer step that updated the weights: SCE's momentum encoder follows the model."""
    moving = [(gpt, state) for gpt, state in _regularizer_states(model_chunks) if hasattr(state, "update")]
    if moving:
        _gather_new_weights(model_chunks)
    for gpt, state in moving:
        state.update(gpt)


@torch.no_grad()
def _gather_new_weights(model_chunks) -> None:
    """With the distributed optimizer and --overlap-param-gather, a rank holds only its own shard of the new
    weights after a step (the rest arrives during the next forward): gather them all now, as megatron.training
    does before it evaluates or saves. That all-gather is then no longer hidden behind the forward."""
    for chunk in model_chunks:
        if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
            chunk.start_param_sync(force_sync=True)


@contextlib.contextmanager
def regularizer_state_left_out(model_chunks):
    """Around a weights-only load (checkpoint.finetune, Megatron's --finetune): the trained baseline's state is
    not read, as the optimizer's is not, so a checkpoint without one (an import, a SimReg run) loads; the state
    starts afresh from the loaded weights (SCE's momentum encoder becomes their copy, CPretrain's temperature
    keeps its initial value)."""
    held = _regularizer_states(model_chunks)
    for gpt, _ in held:
        del gpt.regularizer_state  # out of state_dict() and sharded_state_dict() while loading
    try:
        yield
        for gpt, state in held:
            if hasattr(state, "start_from"):
                state.start_from(gpt)
    finally:
        for gpt, state in held:
            gpt.regularizer_state = state


def reduce_reports(reports: list[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """Average each reported [sum, count] pair over micro-batches and the data-parallel group, as Megatron does."""
    reduced = {}
    for name in reports[0]:
        total = torch.stack([report[name].float() for report in reports]).sum(0)
        if group is not None:
            dist.all_reduce(total, group=group)
        reduced[name] = (total[0] / total[1].clamp_min(1)).item() if total[1] > 0 else math.nan
    return reduced
