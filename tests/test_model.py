"""The model provider under megatron.training's contract: the TransformerConfig Megatron builds from our
arguments equals `transformer_config_from`'s on every field, and the provider, called the way
megatron.training 0.19 calls it, builds the model from that config."""

import functools
import sys

import pytest
from distributed import run_distributed

from megatron_simreg.config import load_config

# The one field megatron.training's config may hold otherwise: where weights are drawn (our CPU harness passes
# --use-cpu-initialization, as the local loop on a CPU draws them; on GPUs Megatron draws them on the GPU).
BY_DEVICE = {"use_cpu_initialization"}
LAYOUTS = {
    "tiny-llama bf16": ("tiny-llama", ["training.precision=bf16"], 1),
    "tiny-llama TP=2 + SP": ("tiny-llama", ["parallel.tensor=2", "parallel.sequence_parallel=true"], 2),
    "tiny-mixtral EP=2": ("tiny-mixtral", ["parallel.expert=2"], 2),
}


def megatron_config(cfg, world_size, monkeypatch):
    """The TransformerConfig megatron.training derives from `megatron_arguments(cfg)` on `world_size` GPUs."""
    from megatron.training import arguments
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_simreg.megatron_entry import megatron_arguments
    from megatron_simreg.run_plan import plan_run

    # Without Transformer Engine (here) the arguments turn Megatron's two TE fusions off; validate_args asks for
    # an H100's architecture when tensor parallelism is on.
    argv = ["pretrain", *megatron_arguments(cfg, plan_run(cfg, world_size), transformer_engine=False)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # as scripts/launch.sh sets it
    args = arguments.parse_args()
    args.world_size, args.rank = world_size, 0
    arguments.validate_args(args)
    return core_transformer_config_from_args(args)


def comparable(value):
    """Functions compare by what they are (initialisers are made afresh for each config)."""
    if isinstance(value, functools.partial):
        return comparable(value.func), value.args, tuple(sorted(value.keywords.items()))
    return getattr(value, "__qualname__", value) if callable(value) else value


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_derives_the_same_config_from_our_arguments(layout, monkeypatch):
    """Every field, fusions included, so the local loop and megatron.training compute alike (without TE)."""
    import dataclasses

    from megatron_simreg.model import transformer_config_from

    name, overrides, world = LAYOUTS[layout]
    cfg = load_config(f"configs/{name}.yaml", overrides)
    ours, theirs = transformer_config_from(cfg), megatron_config(cfg, world, monkeypatch)
    for field in dataclasses.fields(ours):
        if field.name not in BY_DEVICE:
            assert comparable(getattr(theirs, field.name)) == comparable(getattr(ours, field.name)), field.name


def build_both_ways(rank, world, name, megatron_transformer_config):
    """Parameter names and shapes of the provider's model: from our config, and as megatron.training calls it."""
    from functools import partial

    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_simreg import parallel
    from megatron_simreg.model import model_provider

    cfg = load_config(f"configs/{name}.yaml", ["model.seq_length=32"])
    parallel.initialize(cfg)
    try:
        ours = model_provider(cfg)
        provider = partial(model_provider, cfg)  # what megatron_entry hands to pretrain()
        theirs = provider(pre_process=True, post_process=True, config=megatron_transformer_config,
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        assert theirs.config is megatron_transformer_config
        return [{n: tuple(p.shape) for n, p in model.named_parameters()} for model in (ours, theirs)]
    finally:
        parallel.destroy()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_provider_builds_the_same_model_from_megatrons_config(name, monkeypatch):
    cfg = load_config(f"configs/{name}.yaml", ["model.seq_length=32"])
    ours, theirs = run_distributed(build_both_ways, 1, name, megatron_config(cfg, 1, monkeypatch))[0]
    assert ours == theirs
    assert not any(n.endswith(".bias") for n in ours)  # no biases anywhere
    assert "output_layer.weight" in ours  # untied from the embedding


def build_refusal(rank, world, cfg, megatron_transformer_config):
    """What the provider says when megatron.training hands it `megatron_transformer_config`."""
    from megatron_simreg import parallel
    from megatron_simreg.model import model_provider

    parallel.initialize(cfg)
    try:
        model_provider(cfg, config=megatron_transformer_config)
    except ValueError as error:
        return str(error)
    finally:
        parallel.destroy()


def test_a_recompute_chunk_ending_past_the_simreg_layer_is_refused(monkeypatch):
    """Full recompute in chunks of 2 layers would run layer 0 without autograd: SimReg there would train nothing.
    (Recompute that keeps the layer trains like no recompute: tests/test_megatron_training.py.)"""
    recompute = ("megatron.extra_args=[--recompute-granularity, full, --recompute-method, uniform, "
                 "--recompute-num-layers, 2]")
    cfg = load_config("configs/tiny-llama.yaml", ["model.seq_length=32", "simreg.layer=0", recompute])
    message = run_distributed(build_refusal, 1, cfg, megatron_config(cfg, 1, monkeypatch))[0]
    assert message is not None and "simreg.layer=0 is recomputed inside a chunk of 2 layers" in message, message
