"""Hugging Face export: the exported model's logits equal our Megatron model's, for LLaMA (GQA) and Mixtral."""

import os

import pytest
import torch

from distributed import run_distributed
from megatron_simreg.config import load_config, save_config
from megatron_simreg.data import build_tokenizer

transformers = pytest.importorskip("transformers")


def megatron_logits_and_checkpoint(rank, world, name, run_dir, tokens):
    from megatron_simreg import parallel
    from megatron_simreg.checkpoint import save_checkpoint
    from megatron_simreg.model import model_provider

    cfg = load_config(f"configs/{name}.yaml", ["model.seq_length=16", "model.num_layers=2"])
    parallel.initialize(cfg)
    try:
        model = model_provider(cfg)
        with torch.no_grad():  # give the norms non-trivial weights so their mapping is checked too
            for key, param in model.named_parameters():
                if "norm" in key:
                    param.uniform_(0.5, 1.5)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        save_config(cfg, run_dir)
        save_checkpoint(os.path.join(run_dir, "checkpoints"), 1, {"model": model.state_dict()})
        return logits
    finally:
        parallel.destroy()


@pytest.mark.parametrize("name, architecture", [("tiny-llama", "LlamaForCausalLM"), ("tiny-mixtral", "MixtralForCausalLM")])
def test_exported_logits_equal_ours(name, architecture, tmp_path):
    from megatron_simreg.export_hf import export

    tokens = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    run_dir = str(tmp_path / "run")
    ours = run_distributed(megatron_logits_and_checkpoint, 1, name, run_dir, tokens)[0]
    folder = export(os.path.join(run_dir, "checkpoints"), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    assert type(model).__name__ == architecture
    with torch.no_grad():
        theirs = model(tokens).logits
    assert (ours[..., :32000] - theirs).abs().max().item() < 1e-4
    text = "To be, or not to be, that is the question."
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf_tokenizer(text).input_ids
    ids = ids[1:] if ids and ids[0] == hf_tokenizer.bos_token_id else ids
    assert ids == list(build_tokenizer().tokenize(text))


def test_missing_checkpoint_is_explained(tmp_path):
    from megatron_simreg.export_hf import export

    (tmp_path / "config.yaml").write_text("name: x\nschedule: {train_iters: 10}\n")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export(str(tmp_path / "checkpoints"), str(tmp_path / "out"))
