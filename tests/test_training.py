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
