"""Resuming with settings other than the checkpoint's, in both loops (the local loop and megatron.training).

Another global batch size: the schedule stays in samples, as Megatron counts it (warm-up, decay and the run's
end are the config's iterations times the batch the run started with), and one line says so. Other model
sizes, another precision, another regularizer's state, and AdaGC resumed from a checkpoint without its state:
refused in one line, before anything is written.

One saved run per loop (stopped at iteration 2 of 8 with a global batch of 4, so 8 samples consumed; warm-up 2 x 4
and decay 8 x 4 samples) is copied into each test.
"""

import dataclasses
import math
import re
import shutil

import pytest
from distributed import run_distributed
from test_megatron_training import SETTINGS, adagc_state, megatron_training
from test_training import corpus, read_metrics  # noqa: F401  (corpus is a fixture)

from megatron_simreg.config import load_config

RESUMED = ["training.global_batch_size=8", "optimizer.lr=1.0e-3"]  # batch doubled, and a lower rate after a stop
RESUME_LINE = ("resuming from iteration 2 (8 samples) with training.global_batch_size 4 -> 8: the schedule stays in "
               "samples (warm-up 8, decay 32); training ends at iteration 5 (32 samples)")
CHANGED_LINE = ("resuming from iteration 2 with changed optimizer settings: optimizer.lr 0.002 -> 0.001, "
                "optimizer.min_lr 0.0002 -> 0.0001")
RESIZED = ["model.hidden_size=128", "model.num_layers=3"]
MEGATRON_LINE = re.compile(r"iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \|.*?\| learning rate: (\S+) \|")


def cosine_in_samples(samples: int) -> float:
    """The rate after `samples`: warm-up over 8 samples, cosine from 1e-3 to 1e-4 until 32 (a reference)."""
    if samples <= 8:
        return 1e-3 * samples / 8
    return 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * min(samples - 8, 24) / 24))


def exit_message_or_output(rank, world, run, *args):
    """run(*args): the message it exits with, or what it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run(*args)
    except SystemExit as stop:
        return stop.code
    return printed.getvalue()


def local_training(run_dir, corpus, *overrides):  # noqa: F811
    """`python -m megatron_simreg.train` (the local loop on CPU), in a process of the fork server."""
    from megatron_simreg.train import main

    settings = [*SETTINGS, f"data.prefix={corpus}", f"logging.run_dir={run_dir}", *overrides]
    argv = ["--config", "configs/tiny-llama.yaml", *(f"--set={setting}" for setting in settings)]
    return run_distributed(exit_message_or_output, 1, main, argv)[0]


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):  # noqa: F811
    """Each loop's run stopped at iteration 2 of 8 (exit interval) with a global batch of 4."""
    folder = tmp_path_factory.mktemp("saved")
    local_training(folder / "local", corpus, "training.exit_interval=2")
    megatron_training(folder / "megatron", f"data.prefix={corpus}", "training.exit_interval=2")
    return folder


def copy_of(saved, loop: str, tmp_path):
    shutil.copytree(saved / loop, tmp_path / loop)
    return tmp_path / loop


def test_local_loop_resumes_with_another_global_batch_size_in_samples(saved, corpus, tmp_path):  # noqa: F811
    run_dir = copy_of(saved, "local", tmp_path)
    printed = local_training(run_dir, corpus, *RESUMED)
    assert RESUME_LINE in printed.splitlines(), printed
    assert CHANGED_LINE in printed.splitlines(), printed  # the right iteration, and only what truly changed
    logged = read_metrics(run_dir)
    assert sorted(logged) == [1, 2, 3, 4, 5]
    for iteration, samples in ((3, 16), (4, 24), (5, 32)):
        assert logged[iteration]["learning-rate"] == pytest.approx(cosine_in_samples(samples), rel=1e-12), iteration
        assert logged[iteration]["tokens"] == samples * 32
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "5"


def test_megatron_loop_resumes_with_another_global_batch_size_in_samples(saved, corpus, tmp_path):  # noqa: F811
    run_dir = copy_of(saved, "megatron", tmp_path)
    log = megatron_training(run_dir, f"data.prefix={corpus}", *RESUMED)
    assert RESUME_LINE in log.splitlines(), log[-3000:]
    assert CHANGED_LINE in log.splitlines(), log[-3000:]
    steps = {int(i): (int(end), int(samples), float(lr)) for i, end, samples, lr in MEGATRON_LINE.findall(log)}
    assert sorted(steps) == [3, 4, 5]
    for iteration, samples in ((3, 16), (4, 24), (5, 32)):
        end, consumed, rate = steps[iteration]
        assert (end, consumed) == (5, samples)
        assert rate == pytest.approx(cosine_in_samples(samples), rel=1e-6), iteration
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def refusal_is_one_line(message, run_dir, config_before: str) -> None:
    assert isinstance(message, str) and "\n" not in message, message
    assert message == (
        f"training stopped: checkpoint {run_dir / 'checkpoints'} (iteration 2) was saved with model.num_layers=2, "
        "model.hidden_size=64; this config has 3, 128: resume with the checkpoint's model settings, or start a "
        "new run (another logging.run_dir)"
    )
    assert (run_dir / "config.yaml").read_text() == config_before  # nothing written
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]


def test_local_loop_refuses_other_model_settings_in_one_line(saved, corpus, tmp_path):  # noqa: F811
    run_dir = copy_of(saved, "local", tmp_path)
    before = (run_dir / "config.yaml").read_text()
    refusal_is_one_line(local_training(run_dir, corpus, *RESIZED), run_dir, before)


def pretrain_on_cpu(cfg):
    """What tests/megatron_training_on_cpu.py runs, in this process."""
    from megatron_training_on_cpu import megatron_training_on_cpu

    from megatron_simreg.megatron_entry import pretrain

    cfg.megatron.extra_args += ["--distributed-backend", "gloo", "--use-cpu-initialization"]
    megatron_training_on_cpu()
    pretrain(cfg)


def test_megatron_loop_refuses_other_model_settings_in_one_line(saved, corpus, tmp_path):  # noqa: F811
    """megatron_entry.pretrain refuses before megatron.training starts, so no launch is needed to see it."""
    run_dir = copy_of(saved, "megatron", tmp_path)
    before = (run_dir / "config.yaml").read_text()
    cfg = load_config("configs/tiny-llama.yaml", [*SETTINGS, f"data.prefix={corpus}", f"logging.run_dir={run_dir}",
                                                  *RESIZED])
    refusal_is_one_line(run_distributed(exit_message_or_output, 1, pretrain_on_cpu, cfg)[0], run_dir, before)


def test_dry_run_plans_the_resumed_run_as_both_loops_do(saved, corpus, tmp_path):  # noqa: F811
    import torch

    from megatron_simreg.dry_run import report
    from megatron_simreg.run_plan import plan_run
    from megatron_simreg.train import main

    run_dir = copy_of(saved, "local", tmp_path)
    settings = [*SETTINGS, f"data.prefix={corpus}", f"logging.run_dir={run_dir}"]
    lines = report(load_config("configs/tiny-llama.yaml", [*settings, *RESUMED]), 1).splitlines()
    assert RESUME_LINE in lines and any(" 5 steps, " in line for line in lines)
    with pytest.raises(SystemExit, match=r"^dry run: checkpoint .* was saved with model.num_layers=2, model.hid"):
        main(["--config", "configs/tiny-llama.yaml", "--dry-run", *(f"--set={s}" for s in [*settings, *RESIZED])])
    # 24 samples left in steps of 10: 3 more iterations, the last one past the end; a checkpoint from before the
    # batch was recorded gives the same plan (its samples per iteration)
    cfg = load_config("configs/tiny-llama.yaml", [*settings, "training.global_batch_size=10"])
    plan = plan_run(cfg, 1)
    assert (plan.train_iters, plan.train_samples, plan.warmup_samples, plan.decay_samples) == (5, 38, 8, 32)
    path = run_dir / "checkpoints" / "iter_0000002" / "mp_rank_00_000" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    torch.save({key: value for key, value in state.items() if key not in ("global_batch_size", "model_shape")}, path)
    assert plan_run(cfg, 1) == dataclasses.replace(plan, resumed=dataclasses.replace(plan.resumed, model=None))


def refused_by_both_loops_and_the_dry_run(saved, corpus, tmp_path, *overrides, refusal):  # noqa: F811
    """Each loop's copy of `saved`, resumed with `overrides`, stops in one line, `refusal(checkpoints folder)`
    after the loop's prefix, and so does --dry-run, with nothing written; returns the copies (local, megatron)."""
    from megatron_simreg.train import main

    local, megatron = (copy_of(saved, loop, tmp_path) for loop in ("local", "megatron"))
    before = {run_dir: (run_dir / "config.yaml").read_text() for run_dir in (local, megatron)}
    assert local_training(local, corpus, *overrides) == "training stopped: " + refusal(local / "checkpoints")
    cfg = load_config("configs/tiny-llama.yaml", [*SETTINGS, f"data.prefix={corpus}", f"logging.run_dir={megatron}",
                                                  *overrides])
    assert run_distributed(exit_message_or_output, 1, pretrain_on_cpu, cfg)[0] == (
        "training stopped: " + refusal(megatron / "checkpoints"))
    settings = [*SETTINGS, f"data.prefix={corpus}", f"logging.run_dir={local}", *overrides]
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "configs/tiny-llama.yaml", "--dry-run", *(f"--set={s}" for s in settings)])
    assert stopped.value.code == "dry run: " + refusal(local / "checkpoints")
    assert {run_dir: (run_dir / "config.yaml").read_text() for run_dir in (local, megatron)} == before
    return local, megatron


NO_ADAGC_STATE = ("holds no AdaGC state (saved without AdaGC, or by an older version): resume with "
                  "adagc.load_state=false to start AdaGC afresh (its warm-up again), or with adagc.enabled=false")


@pytest.fixture(scope="module")
def saved_without_adagc(corpus, tmp_path_factory):  # noqa: F811
    """Each loop's run stopped at iteration 2 of 8, trained without AdaGC."""
    folder = tmp_path_factory.mktemp("saved_without_adagc")
    local_training(folder / "local", corpus, "training.exit_interval=2", "adagc.enabled=false")
    megatron_training(folder / "megatron", f"data.prefix={corpus}", "training.exit_interval=2", "adagc.enabled=false")
    return folder


def test_adagc_resumed_without_its_state_is_refused_before_the_model_is_built(saved_without_adagc, corpus,  # noqa: F811
                                                                              tmp_path):
    """Both loops and the dry run refuse in one line that names the fix, read from the checkpoint before anything
    is built (the optimizer's load would refuse only after the model was); the fix then resumes, AdaGC afresh."""
    local, megatron = refused_by_both_loops_and_the_dry_run(saved_without_adagc, corpus, tmp_path,
                                                            refusal=lambda folder: f"checkpoint {folder} (iteration 2) "
                                                                                   + NO_ADAGC_STATE)

    # A resume that leaves the optimizer's state to the load (here megatron flags, which the local loop does not
    # read, so it loads the optimizer all the same) is refused there.
    assert local_training(local, corpus, 'megatron.extra_args=["--no-load-optim"]') == (
        f"training stopped: the checkpoint {NO_ADAGC_STATE}")

    megatron_training(megatron, f"data.prefix={corpus}", "adagc.load_state=false")
    assert adagc_state(megatron / "checkpoints", 8)["step"] == 6  # afresh at the resume: six steps


def test_a_simreg_checkpoint_resumed_as_sce_is_refused_in_one_line_by_both_loops(saved, corpus, tmp_path):  # noqa: F811
    """SCE keeps a momentum encoder that a SimReg run's checkpoint lacks: both loops and the dry run say so in one
    line with the way across (the local loop used to stop in load_state_dict's traceback of missing keys)."""
    refused_by_both_loops_and_the_dry_run(saved, corpus, tmp_path, "regularizer.name=sce", refusal=lambda folder: (
        f"checkpoint {folder} (iteration 2) holds no regularizer state; regularizer.name=sce here keeps regularizer "
        "state encoder: resume with the regularizer it was trained with, or start from its weights in another "
        f"logging.run_dir (checkpoint.load={folder}, checkpoint.finetune=true)"))


def test_another_precision_is_refused_in_one_line_by_both_loops_and_the_way_across_trains(saved, corpus,  # noqa: F811
                                                                                        tmp_path):
    """fp32 checkpoints resumed in bf16 (both loops used to stop in their optimizer loads' KeyError tracebacks):
    one line with the fix, in both loops and the dry run; its weights then train in bf16 in another run folder."""
    local, _ = refused_by_both_loops_and_the_dry_run(saved, corpus, tmp_path, "training.precision=bf16",
                                                     refusal=lambda folder: (
        f"checkpoint {folder} (iteration 2) was trained with training.precision=fp32; this config has bf16: resume "
        f"with training.precision=fp32, or start from its weights in another logging.run_dir (checkpoint.load="
        f"{folder}, checkpoint.finetune=true)"))
    from megatron_simreg.run_plan import plan_run

    # Megatron's --no-load-optim (passed through) reads the weights only, which load in any precision
    plan_run(load_config("configs/tiny-llama.yaml", [*SETTINGS, f"data.prefix={corpus}", f"logging.run_dir={local}",
                                                     "training.precision=bf16",
                                                     'megatron.extra_args=["--no-load-optim"]']), 1)
    local_training(tmp_path / "bf16", corpus, "training.precision=bf16", f"checkpoint.load={local / 'checkpoints'}",
                   "checkpoint.finetune=true")
    assert sorted(read_metrics(tmp_path / "bf16")) == list(range(1, 9))
