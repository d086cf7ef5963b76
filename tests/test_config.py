"""Configs: the paper's models and settings, extends/overrides, unknown keys, impossible layouts."""

import math
import os

import pytest
import torch.distributed as dist

from megatron_simreg.config import ConfigError, check_layout, load_config, save_config

# The paper's Table 4 (layers, heads, hidden, FFN, experts) and Table 5 (peak lr, global batch).
PAPER = {
    "llama2-350m": dict(layers=24, heads=16, hidden=1024, ffn=2371, experts=None, lr=4e-4, batch=512),
    "llama2-1.3b": dict(layers=24, heads=32, hidden=2048, ffn=5461, experts=None, lr=3e-4, batch=2048),
    "llama2-3b": dict(layers=26, heads=32, hidden=3072, ffn=8640, experts=None, lr=3e-4, batch=2048),
    "llama2-7b": dict(layers=32, heads=32, hidden=4096, ffn=11008, experts=None, lr=3e-4, batch=2048),
    "mixtral-8x1b": dict(layers=24, heads=32, hidden=2048, ffn=5632, experts=8, lr=3e-4, batch=512),
}
LAMBDA = {"llama2-350m": 10.0, "llama2-1.3b": 14.142, "llama2-3b": 17.321, "llama2-7b": 20.0, "mixtral-8x1b": 14.142}


def tiny(*overrides):
    return load_config("configs/tiny-llama.yaml", list(overrides))


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_models_have_table_4_shapes_and_table_5_settings(name):
    cfg, want = load_config(f"configs/{name}.yaml"), PAPER[name]
    m = cfg.model
    assert (m.num_layers, m.num_attention_heads, m.hidden_size) == (want["layers"], want["heads"], want["hidden"])
    assert (m.moe_ffn_hidden_size if want["experts"] else m.ffn_hidden_size) == want["ffn"]
    assert m.num_experts == want["experts"] and (want["experts"] is None or m.moe_router_topk == 2)
    assert (m.vocab_size, m.seq_length, m.untie_embeddings_and_output_weights) == (32000, 2048, True)
    o, s = cfg.optimizer, cfg.schedule
    assert (o.lr, o.adam_beta1, o.adam_beta2, o.weight_decay) == (want["lr"], 0.9, 0.95, 0.1)
    assert o.min_lr is None  # one tenth of the peak, resolved where the schedule is built
    assert (s.warmup_steps, s.decay_style) == (2000, "cosine")
    assert (cfg.training.global_batch_size, cfg.training.precision) == (want["batch"], "bf16")
    assert cfg.simreg.enabled and cfg.simreg.temperature == 0.01 and cfg.simreg.layer == -1
    assert cfg.simreg_weight == pytest.approx(LAMBDA[name], abs=1e-3)
    assert cfg.adagc.enabled and (cfg.adagc.lambda_rel, cfg.adagc.beta) == (1.04, 0.99)
    assert check_layout(cfg, 64) >= 1  # each paper model runs as shipped on 8 nodes of 8 GPUs


def test_dense_models_train_for_the_same_number_of_steps_as_the_paper():
    """Appendix: every dense model trains the same N steps, ~52B tokens at batch 2048 (1.3B-7B), so the 350M
    model at batch 512 sees a quarter of that, ~13B tokens (NOTES.md, corrected)."""
    from megatron_simreg.megatron_entry import megatron_arguments
    from megatron_simreg.run_plan import plan_run

    def iterations(name):
        cfg = load_config(f"configs/{name}.yaml")
        args = megatron_arguments(cfg, plan_run(cfg, 64), transformer_engine=True)
        return int(args[args.index("--train-iters") + 1])

    dense = {name: iterations(name) for name in PAPER if not PAPER[name]["experts"]}
    assert len(set(dense.values())) == 1, dense
    steps = dense["llama2-1.3b"]
    assert steps * 2048 * 2048 == pytest.approx(52e9, rel=1e-3)
    assert steps * 512 * 2048 == pytest.approx(13e9, rel=1e-3)  # the 350M budget


def test_tiny_models_are_small_llama_and_mixtral_shapes():
    dense, moe = load_config("configs/tiny-llama.yaml"), load_config("configs/tiny-mixtral.yaml")
    assert dense.model.num_attention_heads == 4 and dense.model.num_query_groups == 2  # GQA
    assert dense.model.vocab_size == 32000 and dense.training.precision == "fp32" and dense.model.num_experts is None
    assert (moe.model.num_experts, moe.model.moe_router_topk, moe.parallel.moe_token_dispatcher) == (4, 2, "allgather")
    assert moe.model.hidden_size == dense.model.hidden_size  # extends the dense tiny config
    assert moe.name == "tiny-mixtral"


def test_simreg_weight_auto_follows_the_hidden_size():
    assert tiny().simreg_weight == pytest.approx(10 * math.sqrt(64 / 1024))
    assert tiny("model.hidden_size=4096").simreg_weight == pytest.approx(20.0)
    assert tiny("simreg.weight=5").simreg_weight == 5.0


def test_overrides_win_over_the_file_and_its_base(tmp_path):
    parent = os.path.relpath(os.path.abspath("configs/tiny-llama.yaml"), tmp_path)  # relative to the child
    (tmp_path / "child.yaml").write_text(
        f"extends: {parent}\nmodel: {{num_layers: 4}}\nsimreg: {{temperature: 0.05}}\n"
    )
    cfg = load_config(
        str(tmp_path / "child.yaml"), ["simreg.temperature=0.02", "simreg.weight=0", "data.prefix=corpus"]
    )
    assert cfg.model.num_layers == 4  # the child's
    assert cfg.model.hidden_size == 64 and cfg.model.num_query_groups == 2  # the parent's, merged per key
    assert cfg.optimizer.adam_beta2 == 0.95  # the base's
    assert cfg.simreg.temperature == 0.02 and cfg.simreg.weight == 0.0 and cfg.simreg_weight == 0.0
    assert cfg.data.prefix == ["corpus"]  # a single path becomes a list of one
    assert cfg.name == "child"


def test_override_values_are_yaml_scalars():
    cfg = tiny("parallel.sequence_parallel=true", "simreg.mode=chunk", "simreg.chunk_size=32", "optimizer.lr=1e-3")
    assert (
        tiny("simreg.weight=2e1").simreg_weight == 20.0 and tiny("optimizer.adam_eps=1.0e-6").optimizer.adam_eps == 1e-6
    )
    assert cfg.parallel.sequence_parallel is True and cfg.simreg.chunk_size == 32 and cfg.optimizer.lr == 1e-3
    assert tiny("simreg.mode=chunk", "simreg.chunk_size=null").simreg.chunk_size is None


@pytest.mark.parametrize("override, message", [
    ("simreg.wieght=1", "unknown config key 'simreg.wieght'.*did you mean simreg.weight"),
    ("simrg.weight=1", "unknown config key 'simrg'.*did you mean simreg"),
    ("parallel.tensor_parallel=2", "unknown config key 'parallel.tensor_parallel'.*parallel.tensor"),
    ("model.zzz=1",
     "unknown config key 'model.zzz' in override 'model.zzz=1'; valid keys: model.num_layers, model.hidden_size"),
    ("simreg.weight.value=1", "override 'simreg.weight.value=1': 'simreg.weight' is a value, not a section"),
])
def test_unknown_keys_name_themselves_and_the_nearest_valid_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {num_layer: 2}\n")
    with pytest.raises(ConfigError, match=r"'model.num_layer' in .*bad.yaml; did you mean model.num_layers"):
        load_config(str(path))


@pytest.mark.parametrize("override, message", [
    ("training.micro_batch_size=two", "'training.micro_batch_size' must be int, got 'two'"),
    ("parallel.sequence_parallel=1", "'parallel.sequence_parallel' must be bool"),
    ("simreg.mode=fast", "simreg.mode must be one of full, chunk"),
    ("simreg.weight=big", "simreg.weight must be a number or 'auto'"),
    ("simreg.temperature=0", "temperature must be positive"),
    ("simreg.chunk_size=64", "simreg.mode is full"),
    ("training.precision=fp16", "training.precision must be one of bf16, fp32"),
    ("simreg=1", "simreg in .* must be a mapping"),
    ("simreg.weight", "is not key=value"),
    ("model.num_query_groups=3", "num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    ("model.hidden_size=66", "hidden_size=66 is not divisible by model.num_attention_heads=4"),
    ("schedule.train_iters=null", "set schedule.train_iters or schedule.train_tokens"),
])
def test_bad_values_are_refused_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


def test_config_files_that_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError, match="not found; the shipped ones are in configs/"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("world, overrides, message", [
    (3, ["parallel.tensor=2"], "world size 3 is not divisible by tensor\\*pipeline\\*context = 2\\*1\\*1"),
    (8, ["parallel.tensor=8"], "num_attention_heads=4 is not divisible by parallel.tensor=8"),
    (4, ["parallel.tensor=4"], "num_query_groups=2 is not divisible by parallel.tensor=4"),
    (2, ["parallel.pipeline=2", "model.num_layers=3"], "num_layers=3 is not divisible by parallel.pipeline=2"),
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.seq_length=127"],
     "seq_length=127 is not divisible by tensor\\*context=2"),
    (2, ["parallel.context=2", "model.seq_length=126"], "seq_length=126 is not divisible by 2\\*context=4"),
    (2, ["parallel.expert=2"], "parallel.expert=2 needs an MoE model"),
    (3, ["model.num_experts=4", "parallel.expert=3", "training.global_batch_size=12"],
     "num_experts=4 is not divisible by parallel.expert=3"),
    (2, ["model.num_experts=4", "parallel.expert=2", "parallel.tensor=2"],
     "parallel.expert=2 must divide data\\*context"),
    (2, ["model.num_experts=4", "model.moe_router_topk=5"], "moe_router_topk=5 exceeds model.num_experts=4"),
    (4, ["training.global_batch_size=6"],
     "global_batch_size=6 is not divisible by micro_batch_size\\*data_parallel = 4\\*4"),
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "simreg.mode=chunk", "simreg.chunk_size=48"],
     "chunk_size=48 does not divide the per-rank sequence piece of 64 tokens"),
    (2, ["parallel.pipeline=2", "simreg.layer=0"], "simreg.layer=0 is not on the last pipeline stage.*layers 1..1"),
])
def test_impossible_layouts_are_refused_with_the_reason(world, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(tiny(*overrides), world)


def test_every_layout_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        check_layout(tiny("parallel.tensor=8", "parallel.pipeline=3"), 16)
    text = str(error.value)
    assert "world size 16" in text and "parallel.tensor=8" in text and "parallel.pipeline=3" in text


def test_an_intermediate_simreg_layer_on_the_last_stage_is_fine():
    assert check_layout(tiny("parallel.pipeline=2", "simreg.layer=1"), 2) == 1


def test_possible_layouts_give_the_data_parallel_size():
    assert check_layout(tiny(), 1) == 1
    assert check_layout(tiny("parallel.tensor=2", "parallel.pipeline=2", "training.global_batch_size=16"), 8) == 2
    assert check_layout(tiny("model.num_experts=4", "parallel.expert=2", "parallel.tensor=2"), 4) == 2


def test_a_bad_layout_fails_before_any_process_group_starts(monkeypatch):
    from megatron_simreg import parallel

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3"):
        parallel.initialize(tiny("parallel.tensor=2"))
    assert not dist.is_initialized()


def test_saved_config_reads_back_with_lambda_resolved(tmp_path):
    cfg = load_config("configs/llama2-1.3b.yaml", ["simreg.temperature=0.02", "parallel.tensor=2"])
    path = save_config(cfg, str(tmp_path / "run"))
    again = load_config(path)
    assert again.simreg.weight == pytest.approx(10 * math.sqrt(2))
    again.simreg.weight = cfg.simreg.weight
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("training.micro_batch_size=0", "training.micro_batch_size must be at least 1, got 0"),
    ("training.global_batch_size=-4", "training.global_batch_size must be at least 1, got -4"),
    ("schedule.train_iters=0", "schedule.train_iters must be at least 1, got 0"),
    ("schedule.train_tokens=0", "schedule.train_tokens must be at least 1, got 0"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps must be at least 0, got -1"),
    ("training.save_interval=0", "training.save_interval must be at least 1, got 0"),
    ("training.log_interval=0", "training.log_interval must be at least 1"),
    ("training.eval_interval=-5", "training.eval_interval must be at least 1"),
    ("training.eval_iters=0", "training.eval_iters must be at least 1"),
    ("training.exit_interval=0", "training.exit_interval must be at least 1"),
    ("model.seq_length=-32", "model.seq_length must be at least 1, got -32"),
    ("model.num_layers=0", "model.num_layers must be at least 1"),
    ("model.vocab_size=0", "model.vocab_size must be at least 1"),
    ("model.norm_epsilon=0", "model.norm_epsilon must be positive"),
    ("parallel.tensor=0", "parallel.tensor must be at least 1"),
    ("optimizer.lr=0", "optimizer.lr must be positive"),
    ("optimizer.lr=-1.0e-3", "optimizer.lr must be positive"),
    ("optimizer.min_lr=-1", "optimizer.min_lr must be at least 0"),
    ("optimizer.min_lr=1", "optimizer.min_lr=1.0 exceeds optimizer.lr=0.002"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be at least 0"),
    ("optimizer.adam_beta2=1", "optimizer.adam_beta2 must be in \\[0, 1\\)"),
    ("optimizer.adam_eps=0", "optimizer.adam_eps must be positive"),
    ("optimizer.clip_grad=-1", "optimizer.clip_grad must be at least 0"),
    ("simreg.weight=-1", "simreg.weight must be at least 0"),
    ("simreg.block_size=0", "simreg.block_size must be at least 1"),
    ("simreg.layer=2", "simreg.layer=2 must be -1 \\(final hidden states\\) or a decoder layer 0..1"),
    ("simreg.layer=-2", "simreg.layer must be at least -1, got -2"),
    ("data.split=abc", "data.split='abc' must be up to three non-negative shares"),
    ("data.split=0,1,1", "data.split='0,1,1' gives the training split no share"),
])
def test_values_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


def test_every_numeric_key_has_a_range():
    """A new numeric setting cannot slip in without one (the schema and its ranges stay side by side)."""
    import dataclasses
    import typing

    from megatron_simreg.config import RANGES, Config

    numeric = []
    for section in dataclasses.fields(Config):
        kind = typing.get_type_hints(Config)[section.name]
        if not dataclasses.is_dataclass(kind) or section.name == "adagc":  # AdaGCConfig checks its own values
            continue
        for f in dataclasses.fields(kind):
            allowed = set(typing.get_args(typing.get_type_hints(kind)[f.name])) or {typing.get_type_hints(kind)[f.name]}
            if allowed & {int, float}:
                numeric.append(f"{section.name}.{f.name}")
    assert sorted(set(numeric) - set(RANGES)) == []


def test_yaml_syntax_errors_are_one_line_naming_the_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: 64: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(bad))
    assert f"{bad}" in str(error.value) and "line 3" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        tiny("simreg.weight=[1,")
    assert "override 'simreg.weight=[1,'" in str(error.value) and "not valid YAML" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_entry_point_refuses_bad_values_in_one_line_before_writing_anything(tmp_path, monkeypatch, capsys):
    from megatron_simreg.train import main

    config = os.path.abspath("configs/tiny-llama.yaml")
    monkeypatch.chdir(tmp_path)
    for override in ("training.save_interval=0", "data.split=abc", "model.seq_length=-1", "simreg.weight=[1,"):
        with pytest.raises(SystemExit) as stop:
            main(["--config", config, "--set", override])
        message = str(stop.value.code)
        assert message.startswith("config error:") and "\n" not in message, message
    assert list(tmp_path.iterdir()) == []
