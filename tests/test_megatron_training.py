"""The GPU entry point through Megatron-LM's own loop (`megatron.training.pretrain`), run on a CPU.

`megatron_training_on_cpu.py` remaps the CUDA calls megatron.training makes; everything else is the
real thing: Megatron parses our arguments, builds our model, runs our forward step and loss, reads our
datasets, steps its optimizer with AdaGC attached, validates, and saves and resumes torch_dist
checkpoints. The local CPU loop is the independent reference: the same config must train the same way
in both, and both checkpoints must export to the same Hugging Face weights.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_training import TINY, corpus, read_metrics  # noqa: F401  (corpus is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Both loops run the same layout through the same megatron-core kernels on the same shapes, so the training
# arithmetic is identical, bf16 included; what differs is how each averages the logged loss over micro-batches
# and ranks (fp32 sums in another order): a few ulps of a loss of ~10, 2e-6 relative. The exported weights went
# through the same optimizer steps and come out bitwise equal (bf16 too, on AVX2 and AVX-512 kernels alike, since
# both loops run the same kernels on one machine); 1e-5 of a tensor's scale is room for a loss-scale or clipping
# coefficient computed in another order, in fp32. In bf16 such a last-bit difference could flip a rounding that
# Adam's sign-like steps carry to ~2 lr (see test_model_parallel.py): if these ever differ, compare as that file
# does, by norms, rather than widening this.
SAME_ARITHMETIC_REL = 2e-6
WEIGHTS_REL = 1e-5
SETTINGS = TINY + ["schedule.train_iters=8", "training.eval_interval=4", "training.save_interval=100"]
TRAIN_LINE = re.compile(r"iteration +(\d+)/ +\d+ \|.*?\| lm loss: (\S+) \| simreg: (\S+) \|")
VALID_LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: (\S+) \|")


def torchrun(processes: int, *command: str, succeed=True):
    """Run `command` (a script or `-m module`) under torchrun on this machine; its standard output (or, with
    succeed=False, the finished process)."""
    # --standalone: torchrun binds its store to a port the OS picks, so runs in parallel never race for one
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    done = subprocess.run(launcher + list(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not succeed:
        return done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def megatron_training(run_dir, *overrides, processes=1, succeed=True):
    return torchrun(processes, os.path.join(ROOT, "tests", "megatron_training_on_cpu.py"), "configs/tiny-llama.yaml",
                    *SETTINGS, f"logging.run_dir={run_dir}", *overrides, succeed=succeed)


def local_training(run_dir, *overrides, processes=1) -> None:
    settings = [
        part for setting in [*SETTINGS, f"logging.run_dir={run_dir}", *overrides] for part in ("--set", setting)
    ]
    torchrun(processes, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml", *settings)


def megatron_losses(log: str) -> dict[int, tuple[float, float]]:
    return {int(i): (float(lm), float(sr)) for i, lm, sr in TRAIN_LINE.findall(log)}


def local_losses(run_dir, relaunched_at=()) -> dict[int, tuple[float, float]]:
    """The local loop's losses as Megatron's log reports them: it prints the first iteration of each launch
    without starting a new log interval, so its line at the second iteration is the mean of two."""
    local = {i: (m["lm loss"], m["simreg"]) for i, m in read_metrics(run_dir).items()}
    for first in (1, *relaunched_at):
        local[first + 1] = tuple((a + b) / 2 for a, b in zip(local[first], local[first + 1]))
    return local


def exported_weights(run_dir, output):
    subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", os.path.join(run_dir, "checkpoints"),
                    "--output", str(output)], cwd=ROOT, check=True, capture_output=True)
    return load_file(os.path.join(output, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811
    """Megatron's loop stopped at iteration 4 (exit interval) and resumed to 8; the local loop straight to 8. Both
    evaluate every 2 iterations, so each Megatron process evaluates twice."""
    folder = tmp_path_factory.mktemp("megatron_training")
    data, evaluations = f"data.prefix={corpus}", "training.eval_interval=2"
    first = megatron_training(folder / "megatron", data, evaluations, "training.exit_interval=4")
    second = megatron_training(folder / "megatron", data, evaluations)
    local_training(folder / "local", data, evaluations)
    return folder, first + second


def test_megatron_loop_trains_like_the_local_loop(runs):
    folder, log = runs
    train, valid = megatron_losses(log), [(int(i), float(lm)) for i, lm in VALID_LINE.findall(log)]
    assert sorted(train) == list(range(1, 9)) and sorted(i for i, _ in valid) == [2, 4, 6, 8]
    expected = local_losses(folder / "local", relaunched_at=(5,))  # iterations 5-8 come after the resume
    for iteration in range(1, 9):  # the same kernels on the same shapes: only the logged average's order differs
        assert train[iteration] == pytest.approx(expected[iteration], rel=SAME_ARITHMETIC_REL), iteration
    # Every evaluation scores the same fixed sample in both loops (Megatron's own would walk on through the set),
    # the second of a process too (its loader started again)
    local_valid = read_metrics(folder / "local", "valid")
    for iteration, value in valid:
        assert value == pytest.approx(local_valid[iteration]["lm loss"], rel=SAME_ARITHMETIC_REL), iteration
    assert train[8][0] < train[1][0]


def test_megatron_loop_logs_simreg_and_adagc(runs):
    _, log = runs
    line = next(line for line in log.splitlines() if re.search(r"iteration +8/", line))
    for key in ("simreg live anchors", "simreg negative angle", "grad norm"):
        assert key in line
    adagc = re.findall(r"adagc at iteration +(\d+) \| grad-norm clipped: \S+ \| adagc clipped tensors: (\d+) \| "
                       r"adagc min coeff: (\S+)", log)
    assert [int(i) for i, _, _ in adagc] == list(range(1, 9))
    assert all(0.0 < float(coeff) <= 1.0 for _, _, coeff in adagc)


def test_megatron_checkpoints_hold_adagc_state_and_export_like_the_local_loop(runs, tmp_path):
    folder, _ = runs
    checkpoints = folder / "megatron" / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    for iteration in (4, 8):
        assert (checkpoints / f"iter_{iteration:07d}" / "metadata.json").is_file()  # torch_dist layout
        assert adagc_state(checkpoints, iteration)["step"] == iteration  # inside the checkpoint, not beside it
    megatron = exported_weights(folder / "megatron", tmp_path / "from_megatron")
    local = exported_weights(folder / "local", tmp_path / "from_local")
    assert sorted(megatron) == sorted(local)
    for name in local:
        assert (megatron[name] - local[name]).abs().max() <= WEIGHTS_REL * local[name].abs().max(), name
    assert json.loads((tmp_path / "from_megatron" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def adagc_state(checkpoints, iteration: int) -> dict:
    """AdaGC's state inside a torch_dist checkpoint: the optimizer's entry of its common part."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoints / f"iter_{iteration:07d}"))
    return common["optimizer"]["adagc"]


def test_megatron_loop_stops_before_non_finite_gradients_reach_the_weights(corpus, tmp_path):  # noqa: F811
    """lr = 1e6, as in the local loop's test: Megatron's own gradient check stops the run before the optimizer
    step, in one line naming the last checkpoint, and every checkpoint holds finite weights."""
    import torch

    from megatron_simreg.config import load_config
    from megatron_simreg.export_hf import load_merged_state

    run_dir = tmp_path / "nan"
    done = megatron_training(run_dir, f"data.prefix={corpus}", "optimizer.lr=1.0e+6", "schedule.warmup_steps=0",
                             "training.save_interval=1", "schedule.train_iters=30", "training.eval_interval=100",
                             succeed=False)
    assert done.returncode != 0
    line = next((line for line in done.stderr.splitlines() if line.startswith("training stopped:")), None)
    assert line is not None, done.stderr[-3000:]
    failed = int(re.search(r"gradient is not finite at iteration (\d+)", line)[1])
    assert f"The last good checkpoint is iteration {failed - 1} in {run_dir / 'checkpoints'}" in line
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == str(failed - 1)
    cfg = load_config(str(run_dir / "config.yaml"))
    for iteration in range(1, failed):
        state = load_merged_state(str(checkpoints), cfg, iteration)
        assert all(torch.isfinite(tensor).all() for tensor in state.values()), iteration
    assert not (checkpoints / f"iter_{failed:07d}").exists()


LR_LINE = re.compile(r"iteration +(\d+)/ +\d+ \|.*?\| learning rate: (\S+) \|")


def test_megatron_loop_resumes_with_changed_optimizer_settings(corpus, tmp_path):  # noqa: F811
    """As the local loop's test: resumed from iteration 2 of 4 (checkpoint.load_iteration) with another lr,
    min_lr, warm-up, length and weight decay; Megatron's parameter groups and scheduler take them, and one line
    says what changed."""
    data = f"data.prefix={corpus}"
    megatron_training(tmp_path, data, "schedule.train_iters=4", "training.save_interval=2")
    new = ["optimizer.lr=1.0e-3", "optimizer.min_lr=1.0e-4", "schedule.warmup_steps=1", "optimizer.weight_decay=0.01",
           "schedule.train_iters=6", "checkpoint.load_iteration=2"]
    log = megatron_training(tmp_path, data, *new)
    line = next(line for line in log.splitlines() if "changed optimizer settings" in line)
    assert "resuming from iteration 2" in line
    for change in ("optimizer.lr 0.002 -> 0.001", "optimizer.min_lr 0.0002 -> 0.0001", "schedule.warmup_steps 2 -> 1",
                   "schedule.train_iters 4 -> 6", "optimizer.weight_decay 0.1 -> 0.01"):
        assert change in line, line
    rates = {int(i): float(lr) for i, lr in LR_LINE.findall(log)}
    assert sorted(rates) == [3, 4, 5, 6]
    for iteration, rate in rates.items():  # the rate set after step k: cosine from 1e-3 to 1e-4 over steps 1..6
        assert rate == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (iteration - 1) / 5)), rel=1e-6)


def test_megatron_loop_saves_on_sigterm_and_resumes_like_the_uninterrupted_run(runs, corpus, tmp_path):  # noqa: F811
    """SIGTERM (a Slurm time limit) mid-run: Megatron's own signal handler finishes the step and saves, one line
    says so, the exit code is 143 (requeue); run again, every loss equals the local loop's uninterrupted run.

    One process without torchrun, so the signal goes to it; its shell exports MASTER_ADDR/MASTER_PORT (a port
    another process holds) but no rank variables, as in a cluster allocation: it makes a group of one."""
    import signal
    import socket
    import time

    folder, _ = runs
    run_dir, data = tmp_path / "megatron", f"data.prefix={corpus}"
    command = [sys.executable, os.path.join(ROOT, "tests", "megatron_training_on_cpu.py"), "configs/tiny-llama.yaml",
               *SETTINGS, f"logging.run_dir={run_dir}", data]
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with socket.create_server(("127.0.0.1", 0)) as held, open(out, "w") as stdout, open(err, "w") as stderr:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(held.getsockname()[1]))
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        deadline = time.time() + 600
        while process.poll() is None and time.time() < deadline and 2 not in megatron_losses(out.read_text()):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=600)
    first = out.read_text()
    lines = [line for line in err.read_text().splitlines() if line.startswith("training stopped:")]
    assert process.returncode == 143 and len(lines) == 1, err.read_text()[-3000:]
    saved = int(re.search(r"received SIGTERM: finished iteration (\d+) and saved it", lines[0])[1])
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(saved)
    assert sorted(megatron_losses(first)) == list(range(1, saved + 1))
    train = {**megatron_losses(first), **megatron_losses(megatron_training(run_dir, data))}
    expected = local_losses(folder / "local", relaunched_at=(saved + 1,))
    assert sorted(train) == list(range(1, 9))
    for iteration in range(1, 9):
        assert train[iteration] == pytest.approx(expected[iteration], rel=SAME_ARITHMETIC_REL), iteration


def test_simreg_on_an_intermediate_layer_trains_under_activation_recompute(corpus, tmp_path):  # noqa: F811
    """`simreg.layer=0` (Sec. 5.3) with Megatron's activation recompute: selective (attention only) and full
    (every layer recomputed in backward, its forward run without autograd) give the gradient norm of the run
    without recompute, lambda * SimReg's part included (at lambda = 1000 it dominates the norm; losses alone barely
    tell, Adam's first steps being sign-like), and train alike (a chunk ending past the layer is refused:
    tests/test_model.py)."""
    settings = [f"data.prefix={corpus}", "simreg.layer=0", "simreg.weight=1000", "optimizer.lr=0.05",
                "schedule.warmup_steps=0", "schedule.train_iters=3", "training.eval_interval=100"]
    logs = {
        recompute: megatron_training(tmp_path / str(i), *settings, f"megatron.extra_args=[{', '.join(recompute)}]")
        for i, recompute in enumerate([(), ("--recompute-activations",),
                                       ("--recompute-granularity", "full", "--recompute-method", "uniform",
                                        "--recompute-num-layers", "1")])
    }
    norms = {recompute: [float(n) for n in re.findall(r"grad norm: (\S+)", log)] for recompute, log in logs.items()}
    plain, plain_norms = megatron_losses(logs.pop(())), norms.pop(())
    assert sorted(plain) == [1, 2, 3] and len(plain_norms) == 3
    # The same arithmetic but for the order in which the layer's gradient sums (a recomputed chunk adds its own
    # apart), which Adam at this lr carries to 3.4e-6 of the losses by iteration 3.
    for recompute, log in logs.items():
        assert norms[recompute] == pytest.approx(plain_norms, rel=2e-5), recompute
        losses = megatron_losses(log)
        assert sorted(losses) == [1, 2, 3], recompute
        for iteration, values in losses.items():
            assert values == pytest.approx(plain[iteration], rel=2e-5), (recompute, iteration)
