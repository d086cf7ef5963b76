"""The Table 1 baselines in training: the same step in every batch and parallel layout (DP=2, TP=2 + SP, CP=2
over gloo), vocabulary-parallel Jensen-Shannon, a few steps that lower each one's own term, dropout in training
only, exact resume with their state (CPretrain's temperature, SCE's momentum encoder) in the local loop,
megatron.training's loop on CPU, the Hugging Face export leaving their state out, and the config's errors."""

import contextlib
import copy
import math
import re

import pytest
import torch
from distributed import run_distributed
from layout_steps import BASE, batch_for, forward_backward
from test_batch_layouts import LAYOUTS, assert_same_step, layout_steps
from test_megatron_training import SETTINGS, local_training, megatron_training
from test_training import config, corpus, read_metrics, train_worker  # noqa: F401  (corpus is a fixture)

from megatron_simreg.config import ConfigError, load_config

# Views without dropout (p = 0) so every layout sees the same views: dropout masks come from each rank's RNG.
BASELINES = {
    "simcse": ["regularizer.name=simcse", "regularizer.dropout=0"],
    "cpretrain": ["regularizer.name=cpretrain"],
    "creg": ["regularizer.name=creg", "regularizer.mode=chunk", "regularizer.chunk_size=16", "regularizer.dropout=0"],
    "sce": ["regularizer.name=sce", "regularizer.target=ema", "regularizer.mode=chunk", "regularizer.chunk_size=16",
            "regularizer.dropout=0", "regularizer.target_dropout=0"],
}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    return layout_steps(str(tmp_path_factory.mktemp("weights") / "weights"), BASELINES)


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "micro-batch 8"])
def test_one_step_is_the_same_whatever_the_layout(steps, layout, name):
    """Full pairing gathers the keys under TP + SP (simcse, cpretrain), chunks stay on their rank (creg, sce);
    CPretrain's label embeddings are looked up vocabulary-parallel and its temperature is summed over the
    sequence-parallel ranks."""
    want = steps["micro-batch 8"][name]
    assert want[0][name] > 1e-3, f"{name} must weigh in this step"
    assert_same_step(steps[layout][name], want, ("lm loss", "simreg", name))
    if name == "cpretrain":
        assert want[1]["regularizer_state.log_scale"].abs().item() > 0  # the temperature is trained


def test_context_parallel_equals_one_process(tmp_path):
    """CP=2 hands each rank two zigzag chunks: full pairing gathers them (CPretrain, with its label embeddings
    and temperature); all-ones masks, as Megatron weighs CP ranks by their own tokens (test_parallel_training)."""
    from layout_steps import merged
    from test_parallel_training import step_worker

    checkpoint, cpretrain = str(tmp_path / "weights"), ["regularizer.name=cpretrain"]
    expected = merged(run_distributed(step_worker, 1, cpretrain, checkpoint, True, False))
    got = merged(run_distributed(step_worker, 2, cpretrain + ["parallel.context=2"], checkpoint, False, False))
    for key in ("lm loss", "simreg", "cpretrain"):
        assert got[0][key] == pytest.approx(expected[0][key], rel=1e-5), key
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


def jensen_shannon_worker(rank, world, logits_p, logits_q):
    from megatron_simreg.regularizers.creg import jensen_shannon

    group = torch.distributed.group.WORLD if world > 1 else None
    shard = logits_p.shape[-1] // world
    p, q = (x[..., rank * shard:(rank + 1) * shard].clone().requires_grad_() for x in (logits_p, logits_q))
    value = jensen_shannon(p, q, group)
    (value * torch.arange(1, value.numel() + 1).view_as(value)).sum().backward()
    return value.detach(), p.grad, q.grad


def test_jensen_shannon_over_a_split_vocabulary_equals_one_process():
    gen = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(2, 5, 3, 12, generator=gen)
    (whole, grad_p, grad_q), = run_distributed(jensen_shannon_worker, 1, logits_p, logits_q)
    halves = run_distributed(jensen_shannon_worker, 2, logits_p, logits_q)
    for value, _, _ in halves:
        torch.testing.assert_close(value, whole)
    torch.testing.assert_close(torch.cat([h[1] for h in halves], -1), grad_p)
    torch.testing.assert_close(torch.cat([h[2] for h in halves], -1), grad_q)
    assert whole.min() > 0


def test_jensen_shannon_value_and_gradient_equal_a_float64_reference():
    """The gradient is written out by hand: against float64 autograd through the definition, with logits far
    apart (p and q put mass on different classes, some near 0 in one and 1 in the other). fp32 arithmetic
    summed pairwise over 1000 classes: each term a few ulp (6e-8) of values below log 2, so 1e-5 is loose."""
    gen = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(2, 3, 4, 1000, generator=gen) * 6
    logits_p[..., 7] += 30  # p almost one-hot where q is not
    from megatron_simreg.regularizers.creg import jensen_shannon

    p, q = (x.clone().requires_grad_() for x in (logits_p, logits_q))
    weights = torch.rand(3, 4, generator=gen)
    value = jensen_shannon(p, q, None)
    value.mul(weights).sum().backward()
    p64, q64 = (x.double().requires_grad_() for x in (logits_p, logits_q))
    a, b = torch.softmax(p64, -1), torch.softmax(q64, -1)
    m = (a + b) / 2
    reference = ((a * (a / m).log()).sum(-1) + (b * (b / m).log()).sum(-1)) / 2
    reference.mul(weights.double()).sum().backward()
    torch.testing.assert_close(value.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5, atol=1e-6)


def own_term_worker(rank, world, runs, steps):
    """Each run's baseline on one fixed batch: its value at each of `steps` optimizer steps."""
    from megatron_simreg import parallel
    from megatron_simreg.local_loop import build_model_and_optimizer
    from megatron_simreg.objective import update_regularizer_state

    values = {}
    for label, overrides in runs.items():
        cfg = load_config("configs/tiny-llama.yaml", BASE + overrides)
        parallel.initialize(cfg)
        try:
            torch.manual_seed(0)
            model, optimizer = build_model_and_optimizer(cfg)
            values[label] = []
            for _ in range(steps):
                optimizer.zero_grad()
                values[label].append(forward_backward(cfg, model, seed=0)[cfg.regularizer.name])
                if optimizer.step()[0]:
                    update_regularizer_state([model])
            assert all(layer.hidden_dropout == 0.0 for layer in model.module.decoder.layers)  # restored after views
        finally:
            parallel.destroy()
    return values


def finetune_load_worker(rank, world, overrides):
    """A SimReg model's weights (no baseline state) loaded as checkpoint.finetune loads them into a model with
    the baseline's state: the baseline state's tensors after the load."""
    from megatron_simreg import parallel
    from megatron_simreg.local_loop import build_model_and_optimizer, parallel_model
    from megatron_simreg.objective import regularizer_state_left_out

    cfg = load_config("configs/tiny-llama.yaml", BASE + overrides)
    parallel.initialize(cfg)
    try:
        torch.manual_seed(1)
        source, _ = build_model_and_optimizer(load_config("configs/tiny-llama.yaml", BASE))
        torch.manual_seed(2)
        model, _ = build_model_and_optimizer(cfg)
        with regularizer_state_left_out([model]):
            parallel_model(model).load_state_dict(parallel_model(source).state_dict())
        weights = {name: t for name, t in parallel_model(source).state_dict().items() if torch.is_tensor(t)}
        state = parallel_model(model).regularizer_state.state_dict()
        return weights, {name: t.clone() for name, t in state.items() if torch.is_tensor(t)}
    finally:
        parallel.destroy()


def test_a_weights_only_load_starts_the_baselines_state_afresh_from_the_loaded_weights():
    """checkpoint.finetune from a checkpoint without the baseline's state (an import, a SimReg run) loads, and SCE's
    momentum encoder starts as a copy of the loaded weights (not of the model's initialisation), CPretrain's
    temperature at its initial value."""
    (weights, sce), = run_distributed(finetune_load_worker, 1, ["regularizer.name=sce"])
    assert sorted(sce) == sorted(f"encoder.{name}" for name in weights)
    for name, tensor in weights.items():
        assert torch.equal(sce[f"encoder.{name}"], tensor.float()), name
    (_, cpretrain), = run_distributed(finetune_load_worker, 1, ["regularizer.name=cpretrain"])
    assert cpretrain["log_scale"].item() == pytest.approx(math.log(1 / 0.07))


def test_training_lowers_each_baselines_own_term():
    """At the defaults (SimCSE's second forward with dropout 0.1, SCE's momentum encoder), and the cheap options
    (dropout views of the final states, SCE's target another such view)."""
    runs = {name: [o for o in overrides if "dropout" not in o] for name, overrides in BASELINES.items()}
    runs["simcse, views dropout"] = ["regularizer.name=simcse", "regularizer.views=dropout"]
    runs["sce, target view"] = ["regularizer.name=sce", "regularizer.target=view"]
    values, = run_distributed(own_term_worker, 1, runs, 8)
    for name, curve in values.items():
        assert all(math.isfinite(v) for v in curve), name
        assert curve[-1] < 0.9 * curve[0], (name, curve)


def dropout_worker(rank, world, runs):
    """Each run's baseline value on one batch, twice with the model in training and twice in evaluation (as both
    loops' `evaluate` put it); and SimCSE's second forward beside a model built with megatron-core's own hidden
    and attention dropout (the same weights and RNG state), and the one it ran on afterwards."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_simreg import parallel
    from megatron_simreg.local_loop import build_model_and_optimizer
    from megatron_simreg.model import model_provider, transformer_config_from
    from megatron_simreg.objective import _dropout, _final_states

    values = {}
    for label, overrides in runs.items():
        cfg = load_config("configs/tiny-llama.yaml", BASE + overrides)
        parallel.initialize(cfg)
        try:
            model, _ = build_model_and_optimizer(cfg)
            for mode in ("train", "eval"):
                getattr(model, mode)()
                values[label, mode] = [forward_backward(cfg, model, forward_only=True)[cfg.regularizer.name]
                                       for _ in range(2)]
        finally:
            parallel.destroy()

    cfg = load_config("configs/tiny-llama.yaml", BASE + ["regularizer.name=simcse"])
    parallel.initialize(cfg)
    try:
        config = transformer_config_from(cfg)
        ours = model_provider(cfg, config=config)
        dropped = copy.copy(config)
        dropped.hidden_dropout = dropped.attention_dropout = 0.1
        theirs = model_provider(cfg, config=dropped)
        theirs.load_state_dict(ours.state_dict())
        batch = {k: v[:2] for k, v in batch_for().items()}
        states = {}
        for name, model in (("ours", ours), ("theirs", theirs)):
            torch.manual_seed(1)
            model_parallel_cuda_manual_seed(1)
            with _dropout(ours, 0.1) if name == "ours" else contextlib.nullcontext():
                states[name] = _final_states(model, batch).detach()
        states["after"] = _final_states(ours, batch).detach()
        states["none"] = _final_states(theirs.eval(), batch).detach()
    finally:
        parallel.destroy()
    return values, states


@pytest.fixture(scope="module")
def dropout_runs():
    runs = {name: [f"regularizer.name={name}"] for name in ("simcse", "creg", "sce")}  # views: forward, dropout
    (values, states), = run_distributed(dropout_worker, 1, runs)
    return values, states


def test_evaluation_takes_no_dropout_view(dropout_runs):
    """At the defaults, SimCSE's second forward, CReg's dropout views and SCE's (beside its momentum encoder's)
    differ from step to step in training; in evaluation the same weights give the same value every time."""
    values, _ = dropout_runs
    for label in {label for label, _ in values}:
        train, evaluation = values[label, "train"], values[label, "eval"]
        assert train[0] != train[1], label
        assert evaluation[0] == evaluation[1], label


def test_second_forward_drops_out_as_megatron_core_configured_with_that_dropout(dropout_runs):
    """SimCSE's second view: dropout p after the embedding and on every layer's attention and residual branches,
    bitwise as megatron-core's model built with hidden and attention dropout p; no dropout afterwards."""
    _, states = dropout_runs
    assert torch.equal(states["ours"], states["theirs"])
    assert not torch.equal(states["ours"], states["none"])
    assert torch.equal(states["after"], states["none"])


RESUMED = ["schedule.train_iters=4", "training.eval_interval=100", "training.save_interval=100"]


@pytest.fixture(scope="module")
def resumed_runs(corpus, tmp_path_factory):  # noqa: F811
    """CPretrain and SCE (at its defaults) in the local loop: straight to 4, and stopped at 2 then resumed."""
    folder = tmp_path_factory.mktemp("resume")
    runs = {}
    for name in ("cpretrain", "sce"):
        overrides = [f"regularizer.name={name}", *RESUMED]
        run_distributed(train_worker, 1, config(corpus, folder / f"{name}-straight", *overrides))
        stopped = config(corpus, folder / f"{name}-resumed", *overrides, "training.exit_interval=2")
        run_distributed(train_worker, 1, stopped)
        run_distributed(train_worker, 1, config(corpus, folder / f"{name}-resumed", *overrides))
        runs[name] = folder / f"{name}-straight", folder / f"{name}-resumed"
    return runs


@pytest.mark.parametrize("name, state", [("cpretrain", "regularizer_state.log_scale"),
                                         ("sce", "regularizer_state.encoder.decoder.final_layernorm.weight")])
def test_resume_is_exact_with_the_regularizers_state(resumed_runs, name, state):
    straight, resumed = resumed_runs[name]
    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for iteration in a:
        assert a[iteration] == b[iteration], iteration  # every logged figure, the regularizer's included
    saved = torch.load(straight / "checkpoints" / "iter_0000004" / "mp_rank_00_000" / "model_optim_rng.pt",
                       weights_only=False)["model"][state]
    initial = torch.full_like(saved, math.log(1 / 0.07)) if name == "cpretrain" else torch.ones_like(saved)
    assert saved.dtype == torch.float32 and not torch.equal(saved, initial)  # trained / moved, and saved


def test_a_resume_with_another_regularizers_state_is_refused_before_anything_is_built(resumed_runs, corpus):  # noqa: F811
    """What each baseline declares it keeps (state_names, read before a model is built) is what its checkpoints
    hold; resuming one with a regularizer that keeps another state, or none, is refused in one line naming both."""
    from megatron_simreg import regularizers
    from megatron_simreg.checkpoint import CheckpointError
    from megatron_simreg.resume import saved_progress
    from megatron_simreg.run_plan import plan_run

    for name in ("cpretrain", "sce"):
        run = resumed_runs[name][1]
        cfg = config(corpus, run, f"regularizer.name={name}", *RESUMED)
        declared = regularizers.get(name).state_names(cfg.regularizer.settings)
        assert saved_progress(str(run / "checkpoints"), 4).regularizer_state == declared != frozenset()
        plan_run(cfg, 1)  # its own regularizer resumes
    sce = resumed_runs["sce"][1]
    for other, keeps in (("cpretrain", "regularizer state log_scale"), ("simreg", "no regularizer state"),
                         ("sce", "no regularizer state")):
        overrides = [f"regularizer.name={other}"] + (["regularizer.target=view"] if other == "sce" else [])
        with pytest.raises(CheckpointError) as refused:
            plan_run(config(corpus, sce, *overrides, *RESUMED), 1)
        assert str(refused.value) == (
            f"checkpoint {sce / 'checkpoints'} (iteration 4) holds regularizer state encoder; regularizer.name="
            f"{other} here keeps {keeps}: resume with the regularizer it was trained with, or start from its weights "
            f"in another logging.run_dir (checkpoint.load={sce / 'checkpoints'}, checkpoint.finetune=true)")
    # Megatron's own --finetune (passed through) reads no regularizer state either: left to megatron.training
    plan_run(config(corpus, sce, "regularizer.name=cpretrain", 'megatron.extra_args=["--finetune"]', *RESUMED), 1)


def test_export_leaves_the_regularizers_state_out(resumed_runs):
    from megatron_simreg.export_hf import hugging_face_state, load_merged_state

    run = resumed_runs["cpretrain"][1]
    cfg = load_config(str(run / "config.yaml"))
    state = load_merged_state(str(run / "checkpoints"), cfg)
    assert "regularizer_state.log_scale" in state
    weights = hugging_face_state(state, cfg, vocab_size=32000)
    assert "lm_head.weight" in weights and not any("regularizer" in key for key in weights)


def test_megatron_training_moves_the_ema_after_each_successful_step():
    """megatron.training's optimizer step, wrapped as the entry wraps it: a skipped step leaves SCE's EMA alone."""
    from types import SimpleNamespace

    from megatron_simreg.megatron_entry import _with_our_step
    from megatron_simreg.regularizers.sce import SCESettings, SCEState

    gpt = torch.nn.Module()
    gpt.decoder = torch.nn.Module()
    gpt.decoder.final_layernorm = torch.nn.RMSNorm(3)
    encoder = torch.nn.Module()
    encoder.decoder = torch.nn.Module()
    encoder.decoder.final_layernorm = torch.nn.RMSNorm(3)
    gpt.regularizer_state = SCEState(SCESettings(momentum=0.5), gpt, encoder)
    with torch.no_grad():
        gpt.decoder.final_layernorm.weight.fill_(3.0)
    outcomes = iter([(False, None, None), (True, 1.0, None)])
    built = SimpleNamespace(step=lambda: next(outcomes))
    optimizer = _with_our_step(None, lambda config, model_chunks: built)(None, [gpt])  # as get_megatron_optimizer
    assert optimizer.step()[0] is False and torch.equal(encoder.decoder.final_layernorm.weight, torch.ones(3))
    assert optimizer.step()[0] is True and torch.equal(encoder.decoder.final_layernorm.weight, torch.full((3,), 2.0))


def momentum_encoder_worker(rank, world, precision):
    """The dtype of the queries reaching each of the momentum encoder's attention cores, and per-token cosines
    between its final states and the model's own (the encoder starts as the model's copy), on one micro-batch."""
    from megatron_simreg import parallel
    from megatron_simreg.local_loop import build_model_and_optimizer
    from megatron_simreg.objective import SimRegObjective, _baseline_inputs, _final_states, _gpt_model

    cfg = load_config("configs/tiny-llama.yaml", BASE + BASELINES["sce"] + [f"training.precision={precision}"])
    parallel.initialize(cfg)
    try:
        model, _ = build_model_and_optimizer(cfg)
        encoder = _gpt_model(model).regularizer_state.encoder
        dtypes = []
        for layer in encoder.decoder.layers:
            layer.self_attention.core_attention.register_forward_pre_hook(
                lambda module, args, kwargs: dtypes.append((args[0] if args else kwargs["query"]).dtype),
                with_kwargs=True)
        batch, context = batch_for(micro_batches=1), {}
        with torch.no_grad():
            _baseline_inputs(model, SimRegObjective.from_config(cfg), batch, context)
            own = _final_states(model, batch)
        cosines = torch.nn.functional.cosine_similarity(context["target_view"].float(), own.float(), dim=-1)
        return dtypes, cosines
    finally:
        parallel.destroy()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_momentum_encoder_runs_in_the_models_precision(precision):
    """Its weights are fp32 (an EMA needs them), its forward runs in the model's precision: Transformer Engine's
    fused and flash attention take only bf16/fp16 queries (with fp32 ones and --attention-backend fused, as
    configs/base.yaml sets, no backend is left). Its final states are then the model's own within bf16 rounding:
    a relative error e leaves 1 - cos ~ e^2 / 2, and a few 2^-8 through two layers (e ~ 0.02) give under 2e-4, so
    0.999 holds with room. In fp32 the two forwards are one computation on the same weights; only the cosine's own
    fp32 sums (a few 2^-24) separate it from 1."""
    (dtypes, cosines), = run_distributed(momentum_encoder_worker, 1, precision)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtypes == [want, want], dtypes
    assert cosines.min().item() > (0.999 if precision == "bf16" else 1 - 1e-6), cosines.min()


def assert_megatron_log_matches(log, local_run, name, restarts=(1, 3)):
    """Megatron's logged lm loss, SimReg and `name` at iterations 1-4, (re)started at `restarts`, are the local
    loop's."""
    line = re.compile(rf"iteration +(\d+)/ +\d+ \|.*?\| lm loss: (\S+) \| simreg: (\S+) \|.*?\| {name}: (\S+) \|")
    train = {int(i): tuple(map(float, values)) for i, *values in line.findall(log)}
    local = {i: (m["lm loss"], m["simreg"], m[name]) for i, m in read_metrics(local_run).items()}
    for first in restarts:  # Megatron's line after each (re)start averages its first two iterations
        local[first + 1] = tuple((x + y) / 2 for x, y in zip(local[first], local[first + 1]))
    assert sorted(train) == [1, 2, 3, 4]
    for iteration in train:
        assert train[iteration] == pytest.approx(local[iteration], rel=2e-6), iteration


def regularizer_states(runs, cfg_run):
    """Each run's `regularizer_state.*` tensors, read from its last checkpoint (torch_dist or legacy)."""
    from megatron_simreg.export_hf import load_merged_state

    cfg = load_config(str(cfg_run / "config.yaml"))
    states = [load_merged_state(str(run / "checkpoints"), cfg) for run in runs]
    return [{k: v for k, v in state.items() if k.startswith("regularizer_state.")} for state in states]


def test_cpretrain_through_megatron_training_matches_the_local_loop(corpus, tmp_path):  # noqa: F811
    """Megatron's optimizer steps the temperature, its torch_dist checkpoint keeps it across a resume."""
    settings = [f"data.prefix={corpus}", "regularizer.name=cpretrain", "schedule.train_iters=4"]
    log = megatron_training(tmp_path / "megatron", *settings, "training.exit_interval=2")
    log += megatron_training(tmp_path / "megatron", *settings)
    local_training(tmp_path / "local", *settings)
    assert_megatron_log_matches(log, tmp_path / "local", "cpretrain")
    ours, theirs = regularizer_states([tmp_path / "megatron", tmp_path / "local"], tmp_path / "local")
    temperatures = ours["regularizer_state.log_scale"], theirs["regularizer_state.log_scale"]
    torch.testing.assert_close(temperatures[0], temperatures[1], rtol=1e-6, atol=0)
    assert temperatures[0].item() != pytest.approx(math.log(1 / 0.07), abs=1e-6)


def test_sce_through_megatron_training_matches_the_local_loop(corpus, tmp_path):  # noqa: F811
    """SCE's momentum encoder under megatron.training: moved after each step as the local loop moves it (every
    logged value the same; views without dropout, as the two loops' dropout masks come from other RNG states),
    and saved whole in Megatron's torch_dist checkpoint."""
    settings = [f"data.prefix={corpus}", "regularizer.name=sce", "regularizer.dropout=0",
                "regularizer.target_dropout=0", *RESUMED]
    log = megatron_training(tmp_path / "megatron", *settings)
    local = load_config("configs/tiny-llama.yaml", SETTINGS + [f"logging.run_dir={tmp_path / 'local'}", *settings])
    run_distributed(train_worker, 1, local)
    assert_megatron_log_matches(log, tmp_path / "local", "sce", restarts=(1,))
    ours, theirs = regularizer_states([tmp_path / "megatron", tmp_path / "local"], tmp_path / "local")
    assert sorted(ours) == sorted(theirs) and "regularizer_state.encoder.decoder.final_layernorm.weight" in ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=0, msg=key)


def test_sce_follows_every_weight_under_the_overlapped_parameter_gather(corpus, tmp_path):  # noqa: F811
    """DP = 2 with the distributed optimizer and base.yaml's --overlap-param-gather: after a step each rank holds
    only its own shard of the new weights until the next forward gathers the rest, yet the momentum encoder moves
    towards all of them, as in the local loop (whose gather follows the step; the grad reduce overlapped as well,
    which megatron requires with it)."""
    settings = [f"data.prefix={corpus}", "regularizer.name=sce", "regularizer.dropout=0",
                "regularizer.target_dropout=0", "parallel.distributed_optimizer=true", *RESUMED]
    overlapped = "megatron.extra_args=[--overlap-grad-reduce, --overlap-param-gather]"
    megatron_training(tmp_path / "megatron", *settings, overlapped, processes=2)
    local_training(tmp_path / "local", *settings, processes=2)
    ours, theirs = regularizer_states([tmp_path / "megatron", tmp_path / "local"], tmp_path / "local")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize("overrides, message", [
    (["regularizer.name=simclr"], "regularizer.name must be one of simreg, simcse, cpretrain, creg, sce, got 'simclr'"),
    (["regularizer.name=sce", "regularizer.tau_m=0.1"], "unknown config key 'regularizer.tau_m'"),
    (["regularizer.temperature=0.1"], "SimReg's settings are the simreg: section"),
    (["regularizer.name=simcse", "regularizer.views=twice"], "regularizer.views must be one of dropout, forward"),
    (["regularizer.name=creg", "regularizer.temperature=0"], "regularizer.temperature must be positive"),
    (["regularizer.name=simcse", "regularizer.views=forward", "parallel.pipeline=2"], "needs parallel.pipeline=1"),
    (["regularizer.name=sce", "parallel.pipeline=2"], "it needs parallel.pipeline=1 (or target=view)"),
    (["regularizer.name=sce", "model.num_experts=4"], "regularizer.target=ema is not supported with experts"),
])
def test_config_errors_name_the_key(overrides, message):
    from megatron_simreg.config import check_layout

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_layout(load_config("configs/tiny-llama.yaml", overrides), world_size=2)


def test_config_resolves_weights_and_reads_back(tmp_path):
    from megatron_simreg.config import save_config

    cfg = load_config("configs/tiny-llama.yaml", ["regularizer.name=sce", "regularizer.target=ema"])
    assert cfg.regularizer_weight == 1.0 and cfg.regularizer.settings.target == "ema"
    again = load_config(save_config(cfg, str(tmp_path)))
    assert again.regularizer.settings == cfg.regularizer.settings and again.regularizer_weight == 1.0
    simreg = load_config("configs/tiny-llama.yaml", ["simreg.weight=3"])
    assert simreg.regularizer.name == "simreg" and simreg.regularizer_weight == 3.0
    assert load_config("configs/tiny-llama.yaml", ["regularizer.weight=auto"]).regularizer_weight == pytest.approx(2.5)
