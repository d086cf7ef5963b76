"""The local training loop: exact resume, lambda = 0, NaN handling, bad layouts and data."""

import json
import os

import pytest

from distributed import run_distributed
from megatron_simreg.config import load_config
from megatron_simreg.data import prepare_corpus

TINY = [
    "model.seq_length=32", "training.micro_batch_size=2", "training.global_batch_size=4",
    "schedule.warmup_steps=2", "adagc.warmup_steps=2", "training.log_interval=1", "training.eval_iters=1",
    "training.eval_interval=3", "training.save_interval=3", "schedule.train_iters=6",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    text = folder / "texts.jsonl"
    lines = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog and runs far away. " * (3 + i % 5) for i in range(120)]
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    prefix = str(folder / "corpus_text_document")
    prepare_corpus([str(text)], prefix, progress=False)
    return prefix


def config(corpus, run_dir, *overrides):
    return load_config("configs/tiny-llama.yaml", TINY + [f"data.prefix={corpus}", f"logging.run_dir={run_dir}", *overrides])


def train_worker(rank, world, cfg):
    from megatron_simreg.local_loop import train

    return train(cfg)


def read_metrics(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if r["split"] == split}


def test_resume_continues_exactly(corpus, tmp_path):
    run_distributed(train_worker, 1, config(corpus, tmp_path / "straight"))
    run_distributed(train_worker, 1, config(corpus, tmp_path / "resumed", "training.exit_interval=3"))
    assert sorted(read_metrics(tmp_path / "resumed")) == [1, 2, 3]  # stopped, as a Slurm time limit would
    run_distributed(train_worker, 1, config(corpus, tmp_path / "resumed"))  # picks up at iteration 4
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for iteration in range(1, 7):
        for key in ("lm loss", "simreg", "grad-norm", "learning-rate", "adagc min coeff"):
            assert a[iteration][key] == b[iteration][key], (iteration, key)
    assert read_metrics(tmp_path / "straight", "valid")[6]["lm loss"] == read_metrics(tmp_path / "resumed", "valid")[6]["lm loss"]
    assert a[6]["lm loss"] < a[1]["lm loss"]


def test_single_process_runs_need_no_port(corpus, tmp_path):
    """Two CPU runs on one machine must not collide: a plain single-process run opens no rendezvous port
    (the port torchrun would default to is held here by another listener)."""
    import socket
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("127.0.0.1", 29500))
        except OSError:
            pass  # another run holds it already: the condition under test
        else:
            held.listen()
        run = subprocess.run(
            [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
             *(f"--set={o}" for o in TINY + [f"data.prefix={corpus}", f"logging.run_dir={tmp_path}", "schedule.train_iters=3"])],
            capture_output=True, text=True, env=env,
        )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3]


def test_impossible_layout_and_missing_data_are_explained(corpus, tmp_path):
    import subprocess
    import sys

    bad = subprocess.run(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml", "--set", "parallel.tensor=3"],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "num_attention_heads=4 is not divisible by parallel.tensor=3" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
         "--set", f"data.prefix={tmp_path / 'nothing'}", "--set", f"logging.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True,
    )
    assert missing.returncode != 0 and "prepare_data.py" in missing.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml", "--set", "simreg.wieght=0"],
        capture_output=True, text=True,
    )
    assert unknown.returncode != 0 and "did you mean simreg.weight" in unknown.stderr


def nan_worker(rank, world, cfg):
    from megatron_simreg.local_loop import TrainingError, train

    try:
        train(cfg)
    except TrainingError as error:
        return str(error)
    return None


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "nan", "optimizer.lr=1.0e+6", "adagc.enabled=false", "optimizer.clip_grad=0",
                 "schedule.warmup_steps=0", "training.save_interval=1", "schedule.train_iters=30", "training.eval_interval=100")
    message = run_distributed(nan_worker, 1, cfg)[0]
    assert message is not None and "loss is not finite at iteration" in message
    failed = int(message.split("iteration ")[1].split(" ")[0])
    assert failed > 1 and f"last good checkpoint is iteration {failed - 1}" in message
    checkpoints = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert checkpoints[-1] == f"iter_{failed - 1:07d}"  # nothing saved after the NaN


def layer_worker(rank, world, cfg):
    """SimReg on decoder layer 0's output (Sec. 5.3 ablation) differs from SimReg on the final states."""
    import dataclasses

    import torch

    from megatron_simreg import parallel
    from megatron_simreg.local_loop import build_model_and_optimizer
    from megatron_simreg.objective import SimRegObjective, forward_step

    parallel.initialize(cfg)
    try:
        model, _ = build_model_and_optimizer(cfg)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 40, (2, 33), generator=gen)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32),
                 "position_ids": torch.arange(32).expand(2, 32)}
        values = {}
        for layer in (-1, 0, 1):
            objective = dataclasses.replace(SimRegObjective.from_config(cfg), layer=layer)
            output, loss_func = forward_step(objective, lambda it: next(it), iter([batch]), model)
            values[layer] = loss_func(output)[2]["simreg"][0].item()
        return values
    finally:
        parallel.destroy()


def test_simreg_on_an_intermediate_layer(corpus, tmp_path):
    values = run_distributed(layer_worker, 1, config(corpus, tmp_path / "layer", "simreg.temperature=0.1"))[0]
    assert values[0] != values[-1] and values[1] != values[0]
    assert all(v > 0 for v in values.values())
