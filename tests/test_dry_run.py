"""The dry run: every shipped config checks out, sizes match the paper and built models, bad layouts fail."""

import subprocess
import sys

import pytest

from distributed import run_distributed
from megatron_simreg.config import ConfigError, load_config
from megatron_simreg.dry_run import memory_per_gpu, parameter_count, report
from megatron_simreg.megatron_entry import megatron_arguments

PAPER = {"llama2-350m": 350e6, "llama2-1.3b": 1.3e9, "llama2-3b": 3e9, "llama2-7b": 7e9}


@pytest.mark.parametrize("name", list(PAPER) + ["mixtral-8x1b"])
@pytest.mark.parametrize("world", [8, 64])
def test_paper_configs_dry_run_and_fit_80gb(name, world):
    cfg = load_config(f"configs/{name}.yaml")
    text = report(cfg, world)
    assert "does not fit" not in text and f"{world} GPUs" in text
    total = sum(v for k, v in memory_per_gpu(cfg, world // (cfg.parallel.tensor * cfg.parallel.pipeline)).items()
                if k != "optimizer")
    assert total < 80 * 2**30


@pytest.mark.parametrize("name, nominal", PAPER.items())
def test_parameter_counts_match_nominal_sizes(name, nominal):
    count = parameter_count(load_config(f"configs/{name}.yaml"))
    assert count.total == count.active and abs(count.total / nominal - 1) < 0.10


def test_mixtral_total_and_active():
    """Eight ~1B experts share attention and embeddings: under 8B in all, about two experts' worth active."""
    count = parameter_count(load_config("configs/mixtral-8x1b.yaml"))
    assert 6.5e9 < count.total < 8e9 and 1.8e9 < count.active < 2.4e9


def built_parameters(rank, world, name):
    from megatron_simreg import parallel
    from megatron_simreg.model import model_provider

    cfg = load_config(f"configs/{name}.yaml")
    parallel.initialize(cfg)
    try:
        return sum(p.numel() for p in model_provider(cfg).parameters())
    finally:
        parallel.destroy()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_counts_agree_with_a_built_model(name):
    assert run_distributed(built_parameters, 1, name)[0] == parameter_count(load_config(f"configs/{name}.yaml")).total


def test_megatron_parses_the_generated_arguments(monkeypatch):
    from megatron.training.arguments import parse_args

    for name in ("llama2-7b", "mixtral-8x1b"):
        cfg = load_config(f"configs/{name}.yaml")
        monkeypatch.setattr(sys, "argv", ["pretrain"] + megatron_arguments(cfg))
        args = parse_args()
        assert args.num_layers == cfg.model.num_layers and args.hidden_size == cfg.model.hidden_size
        assert args.tensor_model_parallel_size == cfg.parallel.tensor and args.swiglu
        assert args.num_experts == cfg.model.num_experts


def test_impossible_layout_fails_with_the_reason():
    with pytest.raises(ConfigError, match="not divisible by tensor"):
        report(load_config("configs/llama2-7b.yaml"), 6)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/mixtral-8x1b.yaml", "--dry-run", "--world-size", "4"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "parallel.expert=8 must divide" in result.stderr
