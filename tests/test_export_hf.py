"""Hugging Face export: the exported model's logits equal our Megatron model's, for LLaMA (GQA) and Mixtral,
from our CPU loop's `torch` layout and megatron.training's `torch_dist` one, saved in parallel layouts."""

import os

import pytest
import torch
from distributed import run_distributed
from export_hf_cli import export_cli
from tiny_checkpoints import full_logits, save_tiny_checkpoint

from megatron_simreg.data import build_tokenizer

transformers = pytest.importorskip("transformers")

TP2 = ["parallel.tensor=2"]
EP2 = ["parallel.expert=2"]


@pytest.mark.parametrize("name, architecture, layout, world, overrides", [
    ("tiny-llama", "LlamaForCausalLM", "torch", 1, []),
    ("tiny-mixtral", "MixtralForCausalLM", "torch", 1, []),
    ("tiny-llama", "LlamaForCausalLM", "torch", 1, ["model.untie_embeddings_and_output_weights=false"]),
    ("tiny-llama", "LlamaForCausalLM", "torch", 2, TP2),
    ("tiny-llama", "LlamaForCausalLM", "torch_dist", 2, TP2),
    ("tiny-mixtral", "MixtralForCausalLM", "torch_dist", 2, EP2),
], ids=["llama", "mixtral", "llama-tied", "llama-tp2", "llama-tp2-torch_dist", "mixtral-ep2-torch_dist"])
def test_exported_logits_equal_ours(name, architecture, layout, world, overrides, tmp_path):
    from megatron_simreg.export_hf import export

    tokens = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    run_dir = str(tmp_path / "run")
    ours = full_logits(run_distributed(save_tiny_checkpoint, world, name, run_dir, tokens, layout, overrides))
    folder = export(os.path.join(run_dir, "checkpoints"), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    assert type(model).__name__ == architecture
    assert model.config.architectures == [architecture]  # loaders without model_type dispatch (vLLM) need it
    with torch.no_grad():
        theirs = model(tokens).logits
    # fp32 logits of the same weights through two implementations (Megatron's fused QKV and RoPE against Hugging
    # Face's split projections): sums in other orders over hidden 64 and 2 layers, ~1e-6 of logits of order 1.
    assert (ours[..., :32000] - theirs).abs().max().item() < 1e-4
    if layout == "torch" and world == 1:
        text = "To be, or not to be, that is the question."
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert hf_tokenizer(text).input_ids == list(build_tokenizer().tokenize(text))  # no BOS, as in training


def test_missing_partial_and_unknown_checkpoints_are_explained(tmp_path):
    from megatron_simreg.config import load_config
    from megatron_simreg.export_hf import export, hugging_face_state, load_merged_state

    (tmp_path / "config.yaml").write_text("name: x\nschedule: {train_iters: 10}\n")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export(str(tmp_path / "checkpoints"), str(tmp_path / "out"))

    run_dir = tmp_path / "run"
    tokens = torch.zeros(1, 16, dtype=torch.long)
    run_distributed(save_tiny_checkpoint, 1, "tiny-llama", str(run_dir), tokens, "torch_dist")
    cfg = load_config(str(run_dir / "config.yaml"))
    state = load_merged_state(str(run_dir / "checkpoints"), cfg)
    with pytest.raises(ValueError, match=r"cannot hold: \['decoder.layers.0.self_attention.linear_qkv.bias'\]"):
        hugging_face_state({**state, "decoder.layers.0.self_attention.linear_qkv.bias": torch.zeros(1)}, cfg, 32000)
    for shard in (run_dir / "checkpoints" / "iter_0000001").glob("*.distcp"):
        shard.unlink()
    with pytest.raises(ValueError, match="incomplete"):
        export(str(run_dir / "checkpoints"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_export_reads_transformer_engine_checkpoints_on_a_gpu_node_without_needing_te(tmp_path, monkeypatch):
    """On the nodes users train on (CUDA and Transformer Engine present), export builds megatron-core's local
    layers on the CPU and maps a checkpoint written with TE's layer layout by its sharded keys."""
    import sys
    import types

    from megatron_simreg.export_hf import export

    tokens = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    run_dir = str(tmp_path / "run")
    ours = full_logits(run_distributed(save_tiny_checkpoint, 2, "tiny-llama", run_dir, tokens, "torch_dist_te", TP2))
    # this process now looks like a GPU node with Transformer Engine installed (a stand-in package that cannot run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    folder = export(os.path.join(run_dir, "checkpoints"), str(tmp_path / "hf"))
    monkeypatch.undo()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = model(tokens).logits
    assert (ours[..., :32000] - theirs).abs().max().item() < 1e-4  # as test_exported_logits_equal_ours


def test_export_never_deletes_what_it_did_not_write(tmp_path, monkeypatch):
    """The run folder, the working directory, a user's folder: refused, every file kept; an earlier export is
    replaced only with --overwrite, and only when it holds nothing but what the export wrote."""
    run_dir = tmp_path / "run"
    run_distributed(save_tiny_checkpoint, 1, "tiny-llama", str(run_dir), torch.zeros(1, 16, dtype=torch.long))
    (run_dir / "notes.txt").write_text("mine")
    checkpoints = str(run_dir / "checkpoints")

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    before = files(tmp_path)
    for output in (str(run_dir), str(tmp_path)):
        for extra in ((), ("--overwrite",)):
            message = export_cli("--checkpoint", checkpoints, "--output", output, *extra)
            assert message is not None and "not empty" in message and "nothing was deleted" in message, message
            assert "\n" not in message
    monkeypatch.chdir(run_dir)
    message = export_cli("--checkpoint", checkpoints, "--output", ".", "--overwrite")
    assert message is not None and "not empty" in message
    assert files(tmp_path) == before  # nothing deleted, no temporary folder left anywhere

    hf = tmp_path / "hf"
    assert export_cli("--checkpoint", checkpoints, "--output", str(hf)) is None
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    message = export_cli("--checkpoint", checkpoints, "--output", str(hf))
    assert message is not None and "--overwrite" in message
    first = (hf / "model.safetensors").stat().st_mtime_ns
    assert export_cli("--checkpoint", checkpoints, "--output", str(hf), "--overwrite") is None
    assert (hf / "model.safetensors").stat().st_mtime_ns != first
    (hf / "my_eval.json").write_text("{}")  # a file the export did not write: the folder is no longer only ours
    message = export_cli("--checkpoint", checkpoints, "--output", str(hf), "--overwrite")
    assert message is not None and "my_eval.json" in message
    assert (hf / "my_eval.json").is_file() and (hf / "model.safetensors").is_file()
    (hf / "my_eval.json").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_cli("--checkpoint", checkpoints, "--output", str(empty)) is None  # an empty folder is fine
    leftovers = [p.name for p in tmp_path.iterdir() if "partial" in p.name or p.name.startswith(".")]
    assert leftovers == []
