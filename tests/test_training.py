"""The local training loop: exact resume, lambda = 0, NaN handling, bad layouts and data."""

import json
import math
import os
import re

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
    lines = [
        f"Document {i}: " + "the quick brown fox jumps over the lazy dog and runs far away. " * (3 + i % 5)
        for i in range(120)
    ]
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    prefix = str(folder / "corpus_text_document")
    prepare_corpus([str(text)], prefix, progress=False)
    return prefix


def config(corpus, run_dir, *overrides):
    return load_config(
        "configs/tiny-llama.yaml", TINY + [f"data.prefix={corpus}", f"logging.run_dir={run_dir}", *overrides]
    )


def train_worker(rank, world, cfg):
    from megatron_simreg.local_loop import train

    return train(cfg)


def read_metrics(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if r["split"] == split}


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """The tiny run, six iterations without a stop."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_distributed(train_worker, 1, config(corpus, run_dir))
    return run_dir


def assert_same_training(a_dir, b_dir):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for iteration in range(1, 7):
        for key in ("lm loss", "simreg", "grad-norm", "learning-rate", "grad-norm clipped", "adagc min coeff"):
            assert a[iteration][key] == b[iteration][key], (iteration, key)
    assert read_metrics(a_dir, "valid")[6]["lm loss"] == read_metrics(b_dir, "valid")[6]["lm loss"]


def test_resume_continues_exactly(corpus, straight, tmp_path):
    """Also when the checkpoint's AdaGC thresholds are named as Transformer Engine's layers name the tensors (a
    GPU run's, saved by an earlier version): resumed on local layers, the run clips exactly as the straight one."""
    import torch
    from test_adagc_megatron import transformer_engine_name

    run_distributed(train_worker, 1, config(corpus, tmp_path / "resumed", "training.exit_interval=3"))
    assert sorted(read_metrics(tmp_path / "resumed")) == [1, 2, 3]  # stopped, as a Slurm time limit would
    path = tmp_path / "resumed" / "checkpoints" / "iter_0000003" / "mp_rank_00_000" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    adagc = state["optimizer"]["adagc"]
    adagc["gamma"] = {transformer_engine_name(name, moe=False): value for name, value in adagc["gamma"].items()}
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in adagc["gamma"]
    torch.save(state, path)
    (path.parents[1] / "checksums.json").unlink()  # as an earlier version saved it: without checksums
    run_distributed(train_worker, 1, config(corpus, tmp_path / "resumed"))  # picks up at iteration 4
    assert_same_training(straight, tmp_path / "resumed")
    a = read_metrics(straight)
    assert a[6]["lm loss"] < a[1]["lm loss"]


def single_process_environment():
    """This environment without torchrun's variables: a plain `python -m megatron_simreg.train`."""
    return {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}


def interrupted_training(corpus, run_dir, sig, after):
    """The local loop in a process of its own, sent `sig` once `after` iterations are logged: (exit code, stderr)."""
    import subprocess
    import sys
    import time

    settings = TINY + [f"data.prefix={corpus}", f"logging.run_dir={run_dir}"]
    command = [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
               *(f"--set={s}" for s in settings)]
    log = run_dir.parent / f"{run_dir.name}-{sig.name}.log"
    with open(log, "w") as stderr:
        env = dict(single_process_environment(), OMP_NUM_THREADS="1")  # one thread, as the in-process runs
        process = subprocess.Popen(command, stderr=stderr, env=env)
        deadline = time.time() + 600
        while process.poll() is None and time.time() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= after:
                process.send_signal(sig)
                break
            time.sleep(0.05)
        process.wait(timeout=600)
    return process.returncode, log.read_text()


def test_sigterm_and_ctrl_c_save_and_the_resumed_run_equals_an_uninterrupted_one(corpus, straight, tmp_path):
    """A Slurm time limit (SIGTERM), then Ctrl-C (SIGINT): each finishes its step, saves, says so in one line and
    exits with 128 + the signal; run again, the run ends exactly as one never interrupted."""
    import signal

    run_dir = tmp_path / "run"
    for sig, after in ((signal.SIGTERM, 2), (signal.SIGINT, 4)):
        code, stderr = interrupted_training(corpus, run_dir, sig, after)
        assert code == 128 + sig and "Traceback" not in stderr, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.startswith("training stopped:")]
        assert len(lines) == 1 and f"received {sig.name}: finished iteration" in lines[0], stderr[-3000:]
        saved = int(re.search(r"finished iteration (\d+)", lines[0])[1])
        assert (
            saved >= after and (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(saved)
        )
        assert max(read_metrics(run_dir)) == saved
    run_distributed(train_worker, 1, config(corpus, run_dir))
    assert_same_training(straight, run_dir)


def test_single_process_runs_need_no_port(corpus, tmp_path):
    """Two CPU runs on one machine must not collide: a plain single-process run opens no rendezvous port, also
    when the shell exports MASTER_ADDR/MASTER_PORT without RANK/WORLD_SIZE, as cluster allocations often do
    (here that port is held by another listener, so a rendezvous at it could not start)."""
    import socket
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as held:
        env = dict(single_process_environment(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(held.getsockname()[1]))
        run = subprocess.run(
            [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
             *(f"--set={o}"
               for o in TINY + [f"data.prefix={corpus}", f"logging.run_dir={tmp_path}", "schedule.train_iters=3"])],
            capture_output=True, text=True, env=env,
        )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3]
    # megatron-core's start-up warnings about Transformer Engine and apex become one line of ours
    assert "not installed. Falling back" not in run.stderr and "No CUDA runtime" not in run.stderr
    assert run.stderr.count("the local training loop runs on CPU with megatron-core's local layers") == 1


def test_impossible_layout_and_missing_data_are_explained(corpus, tmp_path):
    import subprocess
    import sys

    bad = subprocess.run(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
         "--set", "parallel.tensor=3"],
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
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
         "--set", "simreg.wieght=0"],
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


@pytest.mark.parametrize("clipping", [[], ["adagc.enabled=false", "optimizer.clip_grad=0"]],
                         ids=["adagc", "no-clipping"])
def test_non_finite_gradients_stop_before_the_step_and_keep_the_last_good_checkpoint(clipping, corpus, tmp_path):
    """lr = 1e6: the gradient turns NaN one iteration before the loss does. The run stops there, before the
    optimizer touches the weights; the checkpoint it names (and `latest`) holds only finite tensors."""
    import torch

    cfg = config(corpus, tmp_path / "nan", "optimizer.lr=1.0e+6", *clipping, "schedule.warmup_steps=0",
                 "training.save_interval=1", "schedule.train_iters=30", "training.eval_interval=100")
    message = run_distributed(nan_worker, 1, cfg)[0]
    assert message is not None and "is not finite at iteration" in message and "\n" not in message
    failed = int(re.search(r"at iteration (\d+)", message)[1])
    good = failed - 1
    assert failed > 1 and f"last good checkpoint is iteration {good} " in message
    checkpoints = tmp_path / "nan" / "checkpoints"
    saved = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("iter_"))
    assert (
        saved[-1] == f"iter_{good:07d}" and (checkpoints / "latest_checkpointed_iteration.txt").read_text() == str(good)
    )
    for name in saved:
        state = torch.load(checkpoints / name / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
        assert all(
            torch.isfinite(t).all() for t in state["model"].values() if torch.is_tensor(t) and t.is_floating_point()
        )


def train_printing_worker(rank, world, cfg):
    """train(), returning what it printed."""
    import contextlib
    import io

    from megatron_simreg.local_loop import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(cfg)
    return out.getvalue()


def test_resume_with_changed_optimizer_settings(corpus, tmp_path):
    """Stopped at iteration 3, resumed with another lr, min_lr, warm-up, length and weight decay (as after a NaN
    stop): the new settings apply from the next step on, and one line says what changed."""
    run_distributed(train_worker, 1, config(corpus, tmp_path, "training.exit_interval=3"))
    new = ["optimizer.lr=1.0e-3", "optimizer.min_lr=1.0e-4", "schedule.warmup_steps=1", "optimizer.weight_decay=0.01",
           "schedule.train_iters=8"]
    printed = run_distributed(train_printing_worker, 1, config(corpus, tmp_path, *new))[0]
    line = next(line for line in printed.splitlines() if "changed optimizer settings" in line)
    assert "resuming from iteration 3" in line
    for change in ("optimizer.lr 0.002 -> 0.001", "optimizer.min_lr 0.0002 -> 0.0001", "schedule.warmup_steps 2 -> 1",
                   "schedule.train_iters 6 -> 8", "optimizer.weight_decay 0.1 -> 0.01"):
        assert change in line, line
    logged = read_metrics(tmp_path)
    assert sorted(logged) == list(range(1, 9))
    for iteration in range(4, 9):  # the rate set after step k: cosine from 1e-3 to 1e-4 over steps 1..8
        expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (iteration - 1) / (8 - 1)))
        assert logged[iteration]["learning-rate"] == pytest.approx(expected, rel=1e-12), iteration


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


def test_a_resumed_run_keeps_one_metrics_record_per_iteration_and_no_partial_leftovers(corpus, tmp_path):
    """A run killed after logging iteration 4 with its last checkpoint at 2 (and a save cut short) resumes from 2:
    iterations 3 and 4 are logged once, as trained the second time, and the half-written save is gone."""
    settings = ["schedule.train_iters=4", "training.save_interval=2", "training.eval_interval=2"]
    run_distributed(train_worker, 1, config(corpus, tmp_path, *settings))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "iter_0000005.partial" / "mp_rank_00_000").mkdir(parents=True)  # what kill -9 mid-save leaves
    (checkpoints / "latest_checkpointed_iteration.txt.partial").write_text("5")
    run_distributed(train_worker, 1, config(corpus, tmp_path, *settings, "checkpoint.load_iteration=2"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in records] == [
        ("train", 1), ("train", 2), ("valid", 2), ("train", 3), ("train", 4), ("valid", 4)]
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".lock", "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
