"""SimRegTrainer (megatron_simreg.hf) in transformers' Trainer on a tiny random local Llama, against an independent
recomputation: each sequence alone, unpadded, through a plain forward with `output_hidden_states`, its SimReg from
the float64 reference (tests/simreg_reference.py)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from simreg_reference import reference_loss
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from megatron_simreg.config import ConfigError
from megatron_simreg.hf import IGNORE_INDEX, SimRegTrainer, final_norm

HIDDEN = 32
TAU = 0.01
EPS32 = torch.finfo(torch.float32).eps


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ))


def sequences() -> list[list[int]]:
    """Eight sequences of 6 to 16 tokens from 12 ids, so that labels repeat within a sequence (SimReg's pairs)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 12, (length,), generator=generator).tolist() for length in (16, 6, 11, 9, 14, 7, 16, 10)]


def pad(batch: list[dict]) -> dict:
    """Right padding to the micro-batch's longest sequence, padding labelled -100."""
    longest = max(len(example["input_ids"]) for example in batch)

    def padded(values, fill):
        return torch.tensor([v + [fill] * (longest - len(v)) for v in values])

    ids = [example["input_ids"] for example in batch]
    return {"input_ids": padded(ids, 0), "labels": padded(ids, IGNORE_INDEX),
            "attention_mask": padded([[1] * len(v) for v in ids], 0)}


def trainer(tmp_path, simreg=None, batch=8, accumulation=1, steps=1, **arguments) -> SimRegTrainer:
    args = TrainingArguments(
        str(tmp_path), report_to=[], use_cpu=True, max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", disable_tqdm=True, **arguments,
    )
    dataset = [{"input_ids": ids} for ids in sequences()]
    return SimRegTrainer(model=tiny_llama(), args=args, train_dataset=dataset, eval_dataset=dataset, data_collator=pad,
                         simreg=simreg)


def reference(model, temperature=0.01, chunk_size=None, reduction="group") -> dict[str, float]:
    """Cross-entropy and SimReg of the eight sequences, each alone: (token sums over all sequences) / tokens."""
    cross_entropy, simreg, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for ids in sequences():
            out = model(torch.tensor([ids]), output_hidden_states=True)
            labels = torch.tensor(ids[1:])  # position t predicts token t + 1; the last position predicts nothing
            cross_entropy += F.cross_entropy(out.logits[0, :-1].double(), labels, reduction="sum").item()
            hidden = out.hidden_states[-1][:, :-1].double()
            simreg += reference_loss(hidden, labels[None], temperature=temperature, chunk_size=chunk_size,
                                     reduction=reduction).item() * len(labels)
            tokens += len(labels)
    return {"lm loss": cross_entropy / tokens, "simreg": simreg / tokens}


def simreg_tolerance(weight: float, temperature: float) -> float:
    """fp32 against float64: a cosine of two normalised fp32 vectors is off by up to about HIDDEN * eps, a logit
    by that over tau, and Lsr (a difference of log-sum-exps) and softplus(Lsr) (slope below 1) by twice that."""
    return weight * 2 * HIDDEN * EPS32 / temperature


@pytest.mark.parametrize("simreg, temperature, chunk_size, reduction", [
    (None, 0.01, None, "group"),  # the defaults: full SimReg, per-sequence label groups, tau 0.01, lambda auto
    ({"mode": "chunk", "chunk_size": 4, "reduction": "token", "temperature": 0.1, "weight": 3.0}, 0.1, 4, "token"),
], ids=["defaults", "chunk-token"])
def test_trained_loss_is_cross_entropy_plus_lambda_simreg(tmp_path, simreg, temperature, chunk_size, reduction):
    run = trainer(tmp_path, simreg, batch=4, accumulation=2)  # two micro-batches padded to different lengths
    expected = reference(tiny_llama(), temperature, chunk_size, reduction)
    run.train()
    logged = run.state.log_history[0]
    weight = run.objective.weight
    tolerance = simreg_tolerance(weight, temperature)
    assert expected["simreg"] * weight > 100 * tolerance, "SimReg should weigh in this loss"
    # the cross-entropy in fp32 over 128-entry rows: relative error a few eps, far below 1e-5
    assert logged["lm loss"] == pytest.approx(expected["lm loss"], rel=1e-5)
    assert logged["simreg"] == pytest.approx(expected["simreg"], abs=tolerance / weight)
    assert logged["loss"] == pytest.approx(expected["lm loss"] + weight * expected["simreg"],
                                           rel=1e-5, abs=tolerance)
    assert 0.0 <= logged["simreg live anchors"] <= 1.0
    assert 0.0 < logged["simreg negative angle"] < 180.0
    assert math.isfinite(logged["simreg lsr"])
    assert not final_norm(run.model)._forward_hooks, "the hook lives only while a training step runs"
    # evaluation reports the cross-entropy alone, of the trained weights
    evaluated = run.evaluate()["eval_loss"]
    assert evaluated == pytest.approx(reference(run.model)["lm loss"], rel=1e-5)


def test_gradient_accumulation_does_not_change_the_step(tmp_path):
    def step(name, simreg=None, **layout):
        run = trainer(tmp_path / name, simreg, **layout)
        before = [p.detach().clone() for p in run.model.parameters()]
        run.train()
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(run.model.parameters(), before)])

    whole = step("whole", batch=8, accumulation=1)  # SGD at lr 1: the update is minus the gradient
    accumulated = step("accumulated", batch=2, accumulation=4)  # four micro-batches, each padded to its own length
    without = step("without", {"weight": 0.0}, batch=8, accumulation=1)
    # Both are sums over the same 81 token terms in other orders and paddings: fp32 rounding in the forward moves
    # cosines by ~eps, logits by eps / tau, and each gradient term by that relative to its size; 81 of them
    # bound the difference by 81 * eps / tau of the largest update.
    tolerance = 81 * EPS32 / TAU * whole.abs().max().item()
    torch.testing.assert_close(accumulated, whole, rtol=0.0, atol=tolerance)
    assert (whole - without).abs().max() > 100 * tolerance, "SimReg should move the weights beyond the tolerance"


def test_weight_zero_logs_simreg_without_its_backward(tmp_path, monkeypatch):
    """At lambda 0 SimReg is logged, not trained on: its kernels get detached states (simreg_loss leaves that to
    the caller), so no SimReg backward runs beside the cross-entropy's."""
    import megatron_simreg.objective as objective

    given = []

    def recording(hidden_states, *args, **kwargs):
        given.append(hidden_states.requires_grad)
        return simreg_loss(hidden_states, *args, **kwargs)

    simreg_loss = objective.simreg_loss
    monkeypatch.setattr(objective, "simreg_loss", recording)
    trainer(tmp_path, {"weight": 0.0}).train()
    assert given == [False]


def test_two_data_parallel_processes_take_the_same_step_as_one(tmp_path):
    """torchrun, 2 processes of 4 sequences each (gloo): Trainer sums the valid labels over the processes, so the
    step equals one process's on all 8 (as the accumulation test, up to the order of the 81 token terms)."""
    import subprocess
    import sys
    import textwrap

    tests = os.path.dirname(os.path.abspath(__file__))
    worker = tmp_path / "data_parallel_step.py"
    worker.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {tests!r})
        from test_hf_trainer import trainer
        run = trainer({str(tmp_path / "dp")!r}, batch=4, ddp_backend="gloo")
        before = [p.detach().clone() for p in run.model.parameters()]
        run.train()
        if int(os.environ["RANK"]) == 0:
            torch.save(torch.cat([(p.detach() - b).flatten() for p, b in zip(run.model.parameters(), before)]),
                       {str(tmp_path / "update.pt")!r})
    """))
    root = os.path.dirname(tests)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(worker)], check=True, timeout=300, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"))
    run = trainer(tmp_path / "one", batch=8)
    before = [p.detach().clone() for p in run.model.parameters()]
    run.train()
    whole = torch.cat([(p.detach() - b).flatten() for p, b in zip(run.model.parameters(), before)])
    tolerance = 81 * EPS32 / TAU * whole.abs().max().item()
    torch.testing.assert_close(torch.load(tmp_path / "update.pt"), whole, rtol=0.0, atol=tolerance)


def test_lambda_auto_and_settings(tmp_path):
    assert trainer(tmp_path).objective.weight == pytest.approx(10 * math.sqrt(HIDDEN / 1024))
    assert trainer(tmp_path, {"weight": 0.5, "temperature": 0.05}).objective.weight == 0.5


@pytest.mark.parametrize("settings, message", [
    ({"tempreature": 0.1}, "unknown config key 'simreg.tempreature' in SimRegTrainer(simreg=...); did you mean "
                           "simreg.temperature?"),
    ({"mode": "chunk", "chunk_size": 0}, "simreg.chunk_size must be at least 1, got 0"),
    ({"chunk_size": 64}, "simreg.chunk_size is set but simreg.mode is full"),
    ({"weight": "large"}, "simreg.weight must be a number or 'auto', got 'large'"),
    ({"layer": 0}, "simreg.layer=0: SimRegTrainer regularizes the final hidden states"),
])
def test_bad_settings_are_one_line(tmp_path, settings, message):
    with pytest.raises(ConfigError) as error:
        trainer(tmp_path, settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_what_cannot_work_is_refused_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="GPT2LMHeadModel has no final norm at model.get_decoder\\(\\).norm"):
        final_norm(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)))
    with pytest.raises(ValueError, match="pass no compute_loss_func"):
        SimRegTrainer(model=tiny_llama(), args=TrainingArguments(str(tmp_path), report_to=[]),
                      compute_loss_func=lambda *args, **kwargs: 0.0)
    run = trainer(tmp_path)
    run.data_collator = lambda batch: {key: value for key, value in pad(batch).items() if key != "labels"}
    with pytest.raises(ValueError, match="SimRegTrainer needs `labels` in each batch") as error:
        run.train()
    assert "\n" not in str(error.value)
