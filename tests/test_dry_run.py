"""The dry run: every shipped config checks out, sizes match the paper and built models, bad layouts fail."""

import subprocess
import sys

import pytest
import torch
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


@pytest.mark.parametrize("name", list(PAPER) + ["mixtral-8x1b"])
def test_megatron_accepts_the_generated_arguments_and_performance_flags(name, monkeypatch):
    """What a GPU node runs (Transformer Engine), the configs' megatron.extra_args included, passes Megatron's
    own parser and validation, reaches the TransformerConfig, and is what --dry-run prints."""
    from megatron.training import arguments

    from megatron_simreg.run_plan import plan_run

    cfg = load_config(f"configs/{name}.yaml")
    generated = megatron_arguments(cfg, plan_run(cfg, 64), transformer_engine=True)
    monkeypatch.setattr(sys, "argv", ["pretrain"] + generated)
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)  # an H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
    monkeypatch.setenv("WORLD_SIZE", "64")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # as scripts/launch.sh sets it
    args = arguments.parse_args()
    args.world_size, args.rank = 64, 0
    arguments.validate_args(args)
    assert args.num_layers == cfg.model.num_layers and args.hidden_size == cfg.model.hidden_size
    assert args.tensor_model_parallel_size == cfg.parallel.tensor and args.swiglu
    assert args.num_experts == cfg.model.num_experts
    assert args.overlap_grad_reduce and args.overlap_param_gather and args.use_distributed_optimizer
    # the fusions the TransformerConfig takes from these (building it here would need Transformer Engine)
    assert args.cross_entropy_loss_fusion and args.apply_rope_fusion and args.gradient_accumulation_fusion
    assert args.transformer_impl == "transformer_engine" and args.bias_swiglu_fusion
    assert args.moe_grouped_gemm == bool(cfg.model.num_experts) and args.attention_backend.name == "fused"
    assert " ".join(cfg.megatron.extra_args) in report(cfg, 64)


def test_without_apex_the_gradient_accumulation_fusion_is_off(monkeypatch):
    """A Transformer Engine node without NVIDIA apex (TE from pip): megatron-core's output layer refuses the fusion
    without apex's extension, so the arguments turn it off; this node's answer is megatron-core's own."""
    from megatron.core.tensor_parallel import layers
    from megatron.training import arguments

    from megatron_simreg.megatron_entry import have_apex_wgrad_fusion
    from megatron_simreg.run_plan import plan_run

    assert have_apex_wgrad_fusion() == layers._grad_accum_fusion_available
    cfg = load_config("configs/llama2-1.3b.yaml")
    generated = megatron_arguments(cfg, plan_run(cfg, 64), transformer_engine=True, wgrad_fusion=False)
    monkeypatch.setattr(sys, "argv", ["pretrain"] + generated)
    assert not arguments.parse_args().gradient_accumulation_fusion


def test_impossible_layout_fails_with_the_reason():
    with pytest.raises(ConfigError, match="not divisible by tensor"):
        report(load_config("configs/llama2-7b.yaml"), 6)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/mixtral-8x1b.yaml",
         "--dry-run", "--world-size", "4"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "parallel.expert=8 must divide" in result.stderr


def test_a_hugging_face_tokenizer_folder_reaches_megatron_as_one(tmp_path, monkeypatch):
    """A folder in data.tokenizer is Megatron's HuggingFaceTokenizer (not a SentencePiece model), and Megatron's
    own tokenizer builder reads it with the vocabulary the run plan checked."""
    import shutil

    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training import arguments
    from transformers import LlamaTokenizer

    from megatron_simreg.data import default_tokenizer_path
    from megatron_simreg.run_plan import plan_run

    folder = tmp_path / "hf_tokenizer"
    folder.mkdir()
    shutil.copy(default_tokenizer_path(), folder / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    cfg = load_config("configs/tiny-llama.yaml", [f"data.tokenizer={folder}"])
    plan = plan_run(cfg, 1)
    monkeypatch.setattr(sys, "argv", ["pretrain"] + megatron_arguments(cfg, plan, transformer_engine=False))
    args = arguments.parse_args()
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", str(folder))
    assert build_tokenizer(args).vocab_size == plan.vocab_size == 32000


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_before_launch():
    """One check for both loops and the dry run (the run plan): ids past the embedding would be zeroed under
    tensor parallelism, or crash the GPU on one rank."""
    from megatron_simreg.run_plan import plan_run

    cfg = load_config("configs/tiny-llama.yaml", ["model.vocab_size=1000"])
    with pytest.raises(ConfigError, match="model.vocab_size=1000 .* smaller than the tokenizer's 32000 tokens"):
        plan_run(cfg, 1)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/llama2-7b.yaml", "--dry-run",
         "--set", "model.vocab_size=1000", "--world-size", "8"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "smaller than the tokenizer's 32000 tokens" in result.stderr
