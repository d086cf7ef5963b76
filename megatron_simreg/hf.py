"""SimReg inside transformers' Trainer: the model's own cross-entropy plus lambda * SimReg on the final hidden states.

    from megatron_simreg.hf import SimRegTrainer

    trainer = SimRegTrainer(model=model, args=TrainingArguments(...), train_dataset=..., data_collator=...,
                            simreg={"mode": "chunk", "chunk_size": 512})
    trainer.train()

The final hidden states come from a forward hook on the decoder's final norm (`model.get_decoder().norm`, as in
Llama, Mistral and Mixtral), held only while a training step runs: `output_hidden_states` would keep every layer's.
SimReg's labels are the ones the cross-entropy predicts at each position (`labels` shifted by one); -100 (padding,
prompts) marks positions that are neither anchors nor pair members. Each row of a batch is one sequence, as a
packed pretraining sequence is in our loops. `simreg` holds the keys of the config's `simreg:` section, checked and
turned into the same `SimRegObjective` as our loops' (megatron_simreg.objective): lambda `auto` = 10 * sqrt(hidden /
1024), tau 0.01, the per-sequence `reduction: group`, full or chunk-wise pairs, kernel `auto`.

Gradient accumulation does not change what is trained: Trainer counts the valid labels of the whole accumulated
batch (`num_items_in_batch`, over all processes) and the cross-entropy is its token sum divided by that count;
SimReg enters as lambda * sum_seq S_seq * T_seq divided by the same count, as our loops' `loss_func` adds it beside
the cross-entropy's token sum. SimReg's statistics and the cross-entropy alone (`lm loss`) are logged beside `loss`
(the whole objective) as token-weighted means since the last log. Evaluation reports the cross-entropy alone
(`eval_loss`), comparable with a run without SimReg.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import Trainer

from megatron_simreg.config import ConfigError, SimRegSection, build_config
from megatron_simreg.objective import REPORTED_STATS, SimRegObjective
from megatron_simreg.simreg import SimRegOutput

IGNORE_INDEX = -100  # transformers' label for a position without a target
LOGGED = ("lm loss", *REPORTED_STATS)


def simreg_objective(settings: Mapping | SimRegSection | None, model_config) -> SimRegObjective:
    """Our loops' objective from `settings` (the `simreg:` section's keys) for a model with this transformers config,
    checked as a YAML file's would be, lambda `auto` resolved for its hidden size."""
    if isinstance(settings, SimRegSection):
        settings = dataclasses.asdict(settings)
    text = model_config.get_text_config()
    raw = {
        "name": "transformers",
        # hidden_size resolves lambda `auto`, num_layers bounds simreg.layer; one head passes the head check
        "model": {"hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers, "num_attention_heads": 1},
        "simreg": {} if settings is None else settings,
        "schedule": {"train_iters": 1},  # Trainer keeps its own schedule; the check only wants the run to have one
    }
    config = build_config(raw, source="SimRegTrainer(simreg=...)")
    if config.simreg.layer != -1:
        raise ConfigError(f"simreg.layer={config.simreg.layer}: SimRegTrainer regularizes the final hidden states "
                          "(simreg.layer=-1); the layer ablation runs in our loops (python -m megatron_simreg.train)")
    return SimRegObjective.from_config(config)


def final_norm(model) -> torch.nn.Module:
    """The decoder's final norm: its output is the final hidden states (`output_hidden_states`' last entry)."""
    norm = getattr(model.get_decoder(), "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no final norm at model.get_decoder().norm, where SimRegTrainer "
                         "reads the final hidden states (Llama, Mistral and Mixtral have one)")
    return norm


class SimRegTrainer(Trainer):
    """transformers' Trainer training on the model's cross-entropy plus lambda * SimReg.

    simreg: the `simreg:` section's keys (e.g. `{"weight": 0.5}`) or a `SimRegSection`; keys left out take
    configs/base.yaml's defaults. `weight: 0` computes and logs SimReg without training on it.
    """

    def __init__(self, *args, simreg: Mapping | SimRegSection | None = None, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("SimRegTrainer computes the loss itself (cross-entropy + lambda * SimReg): "
                             "pass no compute_loss_func")
        # Trainer treats a compute_loss_func's loss as normalised over the accumulated batch (`num_items_in_batch`)
        # and scales it for data parallelism as the model's own cross-entropy.
        super().__init__(*args, compute_loss_func=self._loss, **kwargs)
        self.objective = simreg_objective(simreg, self.model.config)
        final_norm(self.model)
        if self.args.n_gpu > 1:
            raise ValueError("SimRegTrainer does not run under torch.nn.DataParallel (several GPUs in one process): "
                             "start one process per GPU with torchrun or accelerate launch")
        if self.get_cp_size() > 1 or self.get_sp_size() > 1:
            raise ValueError("SimRegTrainer pairs the tokens of whole sequences: run it without context or sequence "
                             "parallelism (parallelism_config cp_size=1, sp_size=1)")
        self._captured: dict[str, torch.Tensor] = {}
        self._sums: torch.Tensor | None = None  # LOGGED times tokens, and tokens, since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's, with the final norm's output captured in training (evaluation keeps the cross-entropy)."""
        if not (model.training and self.objective.enabled):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        handle = final_norm(self.model).register_forward_hook(
            lambda _module, _args, output: self._captured.__setitem__("hidden", output))
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
            self._captured.clear()

    def _loss(self, outputs, labels, num_items_in_batch=None):
        """The model's cross-entropy, plus lambda * SimReg when a training forward captured the final states: token
        sums over `num_items_in_batch` (the accumulated batch's valid labels, which Trainer counts whenever the
        batches hold labels)."""
        if labels is None:
            raise ValueError("SimRegTrainer needs `labels` in each batch, e.g. from "
                             "DataCollatorForLanguageModeling(tokenizer, mlm=False)")
        logits = outputs.logits
        cross_entropy = self.model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1],
                                                 num_items_in_batch=num_items_in_batch)
        hidden = self._captured.pop("hidden", None)
        if hidden is None:
            return cross_entropy
        if num_items_in_batch is None:
            raise ValueError("SimRegTrainer divides by the accumulated batch's valid labels, which Trainer counts from "
                             "tensor `labels`: give each batch its labels as a tensor")
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # shifted as the cross-entropy shifts them
        out = self.objective.loss(hidden, targets, targets != IGNORE_INDEX)
        self._record(cross_entropy.detach() * num_items_in_batch, out)
        return cross_entropy + self.objective.weight * out.token_weighted_sum / num_items_in_batch

    def _record(self, cross_entropy_sum: torch.Tensor, out: SimRegOutput) -> None:
        """Add this micro-batch's LOGGED values, each times its valid tokens, as our loops report them."""
        tokens = out.tokens.detach()
        means = torch.stack([out.loss.detach(), out.lsr_mean, out.live_fraction, out.negative_angle])
        sums = torch.cat([cross_entropy_sum.reshape(1).to(tokens), means.to(tokens) * tokens, tokens.reshape(1)])
        self._sums = sums.double() if self._sums is None else self._sums + sums.double()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's, with SimReg's statistics beside the training loss (means over all processes' tokens)."""
        if "loss" in logs and self._sums is not None:
            sums = self.accelerator.reduce(self._sums, "sum") if self.accelerator.num_processes > 1 else self._sums
            logs.update(zip(LOGGED, (sums[:-1] / sums[-1].clamp_min(1.0)).tolist()))
            self._sums = None
        super().log(logs, start_time)
