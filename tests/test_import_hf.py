"""Hugging Face import: a Llama (grouped-query attention), Mistral and Mixtral folder, written here by transformers
with random weights in several safetensors shards, becomes a checkpoint that exports back to the same tensors,
computes transformers' logits (TP = 1 and 2), and trains in both loops; folders it cannot take get one line."""

import json
import math
import os
import shutil

import pytest
import torch
from distributed import run_distributed
from test_megatron_training import ROOT, megatron_losses, torchrun
from test_training import TINY, corpus, read_metrics, train_worker  # noqa: F401  (corpus is a fixture)
from tiny_checkpoints import full_logits

from megatron_simreg.config import load_config
from megatron_simreg.import_hf import import_folder, main

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-5)  # configs/tiny-llama.yaml's model
MODELS = {
    "llama": ("LlamaConfig", dict(intermediate_size=172, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(intermediate_size=172, tie_word_embeddings=True, sliding_window=64)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=False)),
}
CONFIGS = {"llama": "configs/tiny-llama.yaml", "mixtral": "configs/tiny-mixtral.yaml"}
FP32 = ["training.precision=fp32"]  # the weights are written in the training precision: here transformers' fp32


def write_tiny_model(folder, name: str) -> str:
    """A random model of transformers' class, in shards of at most 2 MB, with the default tokenizer."""
    from megatron_simreg.data import default_tokenizer_path
    from megatron_simreg.hf_tokenizer import write_tokenizer

    config_class, extra = MODELS[name]
    config = getattr(transformers, config_class)(**SHAPE, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1, so their mapping is checked too
        for key, param in model.named_parameters():
            if "norm" in key:
                param.copy_(torch.rand(param.shape) + 0.5)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2MB")
    write_tokenizer(default_tokenizer_path(), str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: write_tiny_model(root / name, name) for name in MODELS}


@pytest.fixture(scope="module")
def imported(folders, tmp_path_factory):
    """Each folder imported in the local loop's layout (Mistral at its sliding window's length)."""
    root = tmp_path_factory.mktemp("imported")
    extra = {"mistral": ["model.seq_length=64"], "mixtral": ["model.rotary_base=1000000"]}  # transformers' theta
    return {name: import_folder(folder, str(root / name), CONFIGS.get(name), FP32 + extra.get(name, []), "torch")
            for name, folder in folders.items()}


def tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from megatron_simreg.import_hf import _hub_name

    files = [os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors")]
    return {_hub_name(key): value for path in files for key, value in load_file(path).items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_import_then_export_gives_the_same_tensors_and_config(name, folders, imported, tmp_path):
    from megatron_simreg.export_hf import export

    exported = export(imported[name], str(tmp_path / "hf"))
    original = tensors(folders[name])
    if MODELS[name][1]["tie_word_embeddings"]:
        original.pop("lm_head.weight", None)
    back = tensors(exported)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key  # the same numbers: the mapping moves them, computes nothing
    ours, theirs = (json.load(open(os.path.join(f, "config.json"))) for f in (exported, folders[name]))
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
              "num_local_experts", "num_experts_per_tok"]
    assert {k: ours.get(k) for k in fields} == {k: theirs.get(k) for k in fields}
    # a Mistral folder within its sliding window is a Llama: it exports as one
    assert ours["architectures"] == (["MixtralForCausalLM"] if name == "mixtral" else ["LlamaForCausalLM"])


def test_an_import_split_over_tensor_pipeline_and_expert_ranks_exports_back_the_same_tensors(folders, tmp_path):
    """Each rank's file of the `torch` layout holds its slice (TP = PP = EP = 2): merged back by the export, the
    Mixtral's tensors are the folder's."""
    from megatron_simreg.export_hf import export

    layout = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2", "model.rotary_base=1000000"]
    checkpoints = import_folder(folders["mixtral"], str(tmp_path / "imported"), CONFIGS["mixtral"], FP32 + layout,
                                "torch")
    assert len([name for name in os.listdir(os.path.join(checkpoints, "iter_0000000")) if name.startswith("mp_")]) == 8
    back = tensors(export(checkpoints, str(tmp_path / "hf")))
    original = tensors(folders["mixtral"])
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[key], value) for key, value in original.items())


def our_logits(rank, world, config_path, tokens, overrides):
    """This rank's logits of the model built from the imported config, loaded from the imported checkpoint."""
    from megatron.core import parallel_state

    from megatron_simreg import parallel
    from megatron_simreg.checkpoint import load_checkpoint
    from megatron_simreg.model import model_provider

    cfg = load_config(config_path, overrides)
    parallel.initialize(cfg)
    try:
        model = model_provider(cfg)
        model.load_state_dict(load_checkpoint(cfg.checkpoint.load, 0, weights_only=True)["model"])
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        return logits, parallel_state.get_tensor_model_parallel_rank()
    finally:
        parallel.destroy()


@pytest.mark.parametrize("tensor", [1, 2])
def test_imported_logits_equal_transformers(tensor, folders, imported, tmp_path):
    tokens = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    checkpoints = imported["llama"]
    if tensor > 1:
        checkpoints = import_folder(folders["llama"], str(tmp_path / "tp"), CONFIGS["llama"],
                                    FP32 + [f"parallel.tensor={tensor}"], "torch")
        assert sorted(os.listdir(os.path.join(checkpoints, "iter_0000000"))) == \
            ["checksums.json", "mp_rank_00_000", "mp_rank_01_000"]
    config = os.path.join(os.path.dirname(checkpoints), "config.yaml")
    ours = full_logits(run_distributed(our_logits, tensor, config, tokens, [f"parallel.tensor={tensor}"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float32)
    with torch.no_grad():
        theirs = model(tokens).logits
    # as tests/test_export_hf.py: the same fp32 weights through two implementations, sums in other orders
    assert (ours[..., :32000] - theirs).abs().max().item() < 1e-4


def first_batch_loss(folder, cfg) -> float:
    """transformers' cross-entropy of the imported model on the first global batch the loops train on."""
    from megatron_simreg.data import build_gpt_datasets, build_tokenizer
    from megatron_simreg.run_plan import plan_run

    plan = plan_run(cfg, 1)
    t = cfg.training
    evals = plan.train_iters // t.eval_interval + 1
    train, _, _ = build_gpt_datasets(cfg.data.prefix, build_tokenizer(plan.tokenizer_path), cfg.model.seq_length,
                                     (plan.train_samples, evals * t.eval_iters * t.global_batch_size, 0),
                                     split=cfg.data.split, seed=t.seed)
    samples = [train[i] for i in range(t.global_batch_size)]
    tokens, labels, mask = (torch.stack([torch.as_tensor(s[key]) for s in samples])
                            for key in ("tokens", "labels", "loss_mask"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(tokens).logits.transpose(1, 2), labels, reduction="none")
    return float((losses * mask).sum() / mask.sum())


TWO_STEPS = TINY + ["schedule.train_iters=2", "training.eval_interval=2", "training.save_interval=2",
                    "schedule.warmup_steps=1", "adagc.warmup_steps=1"]


@pytest.mark.parametrize("objective", [[], ["regularizer.name=sce"]], ids=["simreg", "sce"])
def test_the_imported_checkpoint_trains_in_the_local_loop(objective, folders, imported, corpus, tmp_path):  # noqa: F811
    """Two SimReg steps with checkpoint.finetune: the first loss is the imported model's (before any step), the
    optimizer starts fresh, and the run saves into its own folder; the import stays as it was. Also with SCE,
    whose momentum encoder the import does not hold (it starts as a copy of the imported weights)."""
    config = os.path.join(os.path.dirname(imported["llama"]), "config.yaml")
    run_dir = tmp_path / "run"
    cfg = load_config(config, TWO_STEPS + objective + [f"data.prefix={corpus}", f"logging.run_dir={run_dir}"])
    assert cfg.checkpoint.finetune and cfg.checkpoint.load == imported["llama"]
    run_distributed(train_worker, 1, cfg)
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == [1, 2] and all(math.isfinite(m["lm loss"]) for m in metrics.values())
    # the same fp32 weights and tokens through two implementations: ~1e-6 of a loss of ~10
    assert metrics[1]["lm loss"] == pytest.approx(first_batch_loss(folders["llama"], cfg), abs=1e-4)
    assert metrics[1]["simreg"] > 0
    saved = [name for name in os.listdir(run_dir / "checkpoints") if not name.startswith(".")]  # but the run's lock
    assert sorted(saved) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(imported["llama"])) == ["iter_0000000", "latest_checkpointed_iteration.txt"]


def test_the_imported_checkpoint_trains_in_megatron_training(folders, corpus, tmp_path):  # noqa: F811
    """The same in megatron.training's loop, from the torch_dist layout it reads (and --finetune), with SCE: the
    import holds no momentum encoder, which --finetune leaves out of the load (SimReg itself is computed and logged
    at weight 0 under a baseline, as the local loop does)."""
    checkpoints = import_folder(folders["llama"], str(tmp_path / "imported"), CONFIGS["llama"], FP32, "torch_dist")
    assert os.path.isfile(os.path.join(checkpoints, "iter_0000000", "metadata.json"))
    config = os.path.join(os.path.dirname(checkpoints), "config.yaml")
    settings = TWO_STEPS + ["regularizer.name=sce", f"data.prefix={corpus}", f"logging.run_dir={tmp_path / 'run'}"]
    log = torchrun(1, os.path.join(ROOT, "tests", "megatron_training_on_cpu.py"), config, *settings)
    assert f"starting from the weights of {checkpoints} (finetune)" in log
    losses = megatron_losses(log)
    assert sorted(losses) == [1, 2] and all(math.isfinite(lm) for lm, _ in losses.values())
    expected = first_batch_loss(folders["llama"], load_config(config, settings))
    assert losses[1][0] == pytest.approx(expected, abs=1e-4)
    assert (tmp_path / "run" / "checkpoints" / "iter_0000002" / "metadata.json").is_file()


def test_finetune_starts_from_the_import_once_then_resumes_the_runs_own_checkpoints(imported, corpus, tmp_path):  # noqa: F811
    """Both loops' plan: the import's weights at iteration 0 (Megatron's --finetune, --load the import) until the
    run has saved; a relaunch then resumes its own checkpoint (--load its save folder, no --finetune)."""
    from megatron_simreg.config import ConfigError
    from megatron_simreg.megatron_entry import megatron_arguments
    from megatron_simreg.run_plan import plan_run

    config = os.path.join(os.path.dirname(imported["llama"]), "config.yaml")
    settings = TWO_STEPS + [f"data.prefix={corpus}", f"logging.run_dir={tmp_path}"]

    def plan_and_arguments():
        cfg = load_config(config, settings)
        plan = plan_run(cfg, 1)
        args = megatron_arguments(cfg, plan, transformer_engine=False)
        return plan, args[args.index("--load") + 1], "--finetune" in args

    plan, load, finetune = plan_and_arguments()
    assert (plan.finetune, plan.resumed, load, finetune) == (True, None, imported["llama"], True)
    shutil.copytree(imported["llama"], tmp_path / "checkpoints")  # as if the run had saved
    plan, load, finetune = plan_and_arguments()
    assert (plan.finetune, load, finetune) == (False, str(tmp_path / "checkpoints"), False)
    assert plan.resumed is not None and plan.resumed.iteration == 0
    with pytest.raises(ConfigError, match="also where it would save"):
        plan_run(load_config(config, settings + [f"checkpoint.save={imported['llama']}"]), 1)
    with pytest.raises(ConfigError, match="checkpoint.finetune is set but checkpoint.load is not"):
        load_config(config, settings + ["checkpoint.load=null"])


def import_message(*argv) -> str | None:
    """tools/import_hf.py's exit message, or None when it succeeded."""
    try:
        main(list(argv))
    except SystemExit as stop:
        return str(stop.code)
    return None


def test_folders_the_importer_cannot_take_get_one_line(folders, tmp_path):
    # a shard's entry missing from the index: a partial download
    partial = tmp_path / "partial"
    shutil.copytree(folders["llama"], partial)
    index = json.loads((partial / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    cases = [
        ((str(partial),), "is missing weights: model.layers.1.mlp.down_proj.weight"),
        ((str(gpt2),), "is a GPT2LMHeadModel (gpt2); the importer reads LlamaForCausalLM, MistralForCausalLM, "
                       "MixtralForCausalLM folders"),
        ((folders["llama"], "--config", CONFIGS["llama"], "--set", "model.vocab_size=16000"),
         "model.vocab_size is 16000 in the config, smaller than the folder's vocabulary of 32000"),
        ((folders["llama"], "--config", CONFIGS["mixtral"]), "model.num_experts is 4 in the config, None in the"),
        ((folders["mistral"],), "sliding window of 64 tokens, but model.seq_length is 128"),
        ((str(tmp_path),), "holds no config.json"),
    ]
    for (source, *options), expected in cases:
        output = tmp_path / "out"
        message = import_message("--input", source, "--output", str(output), *options)
        assert message is not None and message.startswith("import_hf: ") and expected in message, message
        assert "\n" not in message and not output.exists()


def scratch_mappings() -> list[tuple[int, int]]:
    """This process's address ranges mapped from import scratch files, which are deleted as soon as mapped."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(".import-scratch (deleted)"):
                start, end = (int(address, 16) for address in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


def written_tensors(state) -> list[torch.Tensor]:
    """The tensors of a state a writer was given: torch.save's tensors, dist_checkpointing's ShardedTensors' data."""
    if isinstance(state, (dict, list)):
        return [t for value in (state.values() if isinstance(state, dict) else state) for t in written_tensors(value)]
    if isinstance(state, torch.Tensor):
        return [state]
    data = getattr(state, "data", None)
    return [data] if isinstance(data, torch.Tensor) else []


@pytest.mark.parametrize("layout", ["torch", "torch_dist"])
def test_the_writers_read_every_weight_from_page_cache_not_anonymous_memory(layout, folders, tmp_path, monkeypatch):
    """Memory that stays about a shard whatever the model: each weight the writer is given lies in a shared mapping
    of a scratch file (page cache the kernel can reclaim), which is already unlinked, so none is left behind.
    (bench/import_memory.py measures the peaks.)"""
    from megatron.core import dist_checkpointing

    given = []

    def recording(write):
        def record(state, *args, **kwargs):
            mapped = scratch_mappings()
            for tensor in written_tensors(state):
                start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
                given.append((tensor.numel(), any(low <= start and end <= high for low, high in mapped)))
            return write(state, *args, **kwargs)
        return record

    writer = torch if layout == "torch" else dist_checkpointing  # (the latter calls torch.save on its own copies)
    monkeypatch.setattr(writer, "save", recording(writer.save))
    checkpoints = import_folder(folders["llama"], str(tmp_path / "imported"), CONFIGS["llama"], FP32, layout)
    # every weight, whole or in parts (megatron-core writes SwiGLU's fc1 as two tensors); no vocabulary padding here
    assert sum(size for size, _ in given) == sum(t.numel() for t in tensors(folders["llama"]).values())
    assert all(mapped for _, mapped in given)
    leftovers = [name for _, _, names in os.walk(tmp_path) for name in names if "scratch" in name]
    assert leftovers == [] and not scratch_mappings()  # the files gone, their mappings freed with the tensors
    assert os.path.isdir(checkpoints)
