"""Every entry point answers a user's mistake, Ctrl-C and SIGTERM in one line (no traceback) with its exit code:
bad values before anything is written, a folder that is no tokenizer, a broken checkpoint, a study file that is
no YAML, a stop signal through the launcher (128 + the signal, the checkpoint saved)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from test_training import TINY, corpus  # noqa: F401  (corpus is a fixture)

from megatron_simreg.config import ConfigError, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

# What a user could type that was accepted and failed later (or never): the key named, and what to do.
BAD_VALUES = [
    ("optimizer.lr=.inf", "optimizer.lr", "finite number"),
    ("optimizer.lr=.nan", "optimizer.lr", "finite number"),
    ("model.norm_epsilon=1e999", "model.norm_epsilon", "finite number"),
    ("simreg.weight=-.inf", "simreg.weight", "finite number"),
    ("adagc.lambda_rel=.nan", "adagc.lambda_rel", "finite number"),
    ("regularizer={name: sce, temperature: .inf}", "regularizer.temperature", "finite number"),
    ("data.prefix=['']", "data.prefix", "empty path"),
    ("data.prefix=[0.3, a, b]", "data.prefix", "weight and path pairs"),
    ("data.prefix=[30, a, b, 70]", "data.prefix", "weight and path pairs"),
    ("data.prefix=[-1, a, 2, b]", "data.prefix", "weights must be finite and at least 0"),
    ("data.prefix=[0, a, 0, b]", "data.prefix", "at least one weight must be positive"),
    ("training.seed=4294967296", "training.seed", "in [0, 2**31)"),
    ("name=''", "name", "--set name=tiny-llama"),
]


@pytest.mark.parametrize("override, key, fix", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_a_bad_value_is_refused_at_load_naming_the_key_and_the_fix(override, key, fix):
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny-llama.yaml", [override])
    message = str(error.value)
    assert key in message and fix in message and "\n" not in message, message


def test_data_prefix_takes_what_megatrons_data_path_takes_and_a_run_needs_one():
    from megatron_simreg.run_plan import plan_run

    for prefix in ("[a]", "[a, b]", "[30, a, 70, b]", "[0.5, a, 0, b]", "a"):
        load_config("configs/tiny-llama.yaml", [f"data.prefix={prefix}"])
    empty = load_config("configs/tiny-llama.yaml", ["data.prefix=[]"])  # fine for an export, which reads no data
    with pytest.raises(ConfigError, match=r"^data.prefix is empty: .* e.g. data.prefix=\[data/c4/"):
        plan_run(empty, 1)  # where both loops and the dry run start, before anything is written


def run(*command, cwd=ROOT, **kwargs):
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


def one_line(done, code, program):
    """The process's exit code is `code` and it ends with one line from `program` (no traceback); that line.
    (torch's and megatron-core's import warnings before it are not the entry points' to silence.)"""
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith(f"{program}: ")]
    assert done.returncode == code and len(lines) == 1 and "Traceback" not in done.stderr, (
        done.returncode, done.stderr[-3000:])
    assert done.stderr.strip().splitlines()[-1] == lines[0]
    return lines[0]


def test_one_line_errors_turns_what_a_user_can_fix_into_one_line_and_keeps_a_bugs_traceback(capsys):
    from megatron_simreg.checkpoint import CheckpointError
    from megatron_simreg.cli import Stopped, one_line_errors
    from megatron_simreg.failures import TrainingError

    for error in (ConfigError("a"), FileExistsError("a"), FileNotFoundError("a"), CheckpointError("a"),
                  TrainingError("a"), ImportError("a")):
        with pytest.raises(SystemExit) as stop, one_line_errors("tool"):
            raise error
        assert stop.value.code == "tool: a", type(error)
    for interrupt, code, name in ((KeyboardInterrupt(), 130, "SIGINT"), (Stopped(signal.SIGTERM), 143, "SIGTERM")):
        with pytest.raises(SystemExit) as stop, one_line_errors("tool"):
            raise interrupt
        assert stop.value.code == code
        assert capsys.readouterr().err == f"tool: interrupted by {name} (exit code {code})\n"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ZeroDivisionError), one_line_errors("tool"):  # a bug: its traceback stays
        1 / 0
    assert signal.getsignal(signal.SIGTERM) is before  # SIGTERM raises Stopped only inside the block


def test_training_refuses_a_non_finite_value_before_writing_anything(tmp_path):
    """Checked when the config loads, before either loop is chosen (megatron.training on GPUs, the local loop)."""
    run_dir = tmp_path / "run"
    done = run(sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
               "--set", "optimizer.lr=.inf", "--set", f"logging.run_dir={run_dir}")
    assert one_line(done, 1, "config error") == (
        "config error: config key 'optimizer.lr' must be a finite number, got inf")
    assert not run_dir.exists()


def test_a_folder_that_is_no_tokenizer_is_named_in_one_line(corpus, tmp_path):  # noqa: F811
    from megatron_simreg.run_plan import plan_run

    folder = tmp_path / "not-a-tokenizer"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    cfg = load_config("configs/tiny-llama.yaml", [*TINY, f"data.prefix={corpus}", f"data.tokenizer={folder}"])
    with pytest.raises(ConfigError) as error:
        plan_run(cfg, 1)
    message = str(error.value)
    assert f"data.tokenizer={folder} is neither a sentencepiece model file nor a Hugging Face tokenizer folder" in (
        message) and "tokenizer.json" in message and "\n" not in message, message
    text = tmp_path / "words.txt"
    text.write_text("not a sentencepiece model")
    cfg.data.tokenizer = str(text)
    with pytest.raises(ConfigError, match=f"data.tokenizer={text} is neither a sentencepiece model file"):
        plan_run(cfg, 1)


def test_context_parallelism_without_transformer_engine_is_refused_before_anything_runs(tmp_path):
    """Only Transformer Engine's attention splits a sequence over ranks (megatron-core's local one asserts deep
    in the first forward): a node without it says so, on CPU as on a GPU node with a pip-only install."""
    run_dir = tmp_path / "run"
    done = run(sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
               "--set", "parallel.context=2", "--set", f"logging.run_dir={run_dir}")
    assert one_line(done, 1, "config error").startswith(
        "config error: parallel.context=2 needs Transformer Engine's attention on GPUs")
    assert not run_dir.exists()


def test_ctrl_c_while_training_starts_up_is_one_line_and_130(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
         "--set", f"logging.run_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_mapped(process, "libtorch_cpu")  # importing torch has begun: inside main, whatever the load
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if not line.startswith("megatron-simreg: no GPU")]
    assert process.returncode == 130 and len(lines) == 1 and "Traceback" not in err, (process.returncode, err)
    assert "SIGINT" in lines[0]


def _wait_until_mapped(process, library, timeout=60):
    """Until `process` has `library` in its address space (a fixed sleep lands before main on a loaded machine)."""
    deadline = time.time() + timeout
    while library not in open(f"/proc/{process.pid}/maps").read():
        assert process.poll() is None and time.time() < deadline, f"{library} never loaded"
        time.sleep(0.01)


def test_ctrl_c_inside_code_run_from_a_string_is_still_130(tmp_path):
    """Ctrl-C landing in code run from a string (dataclasses and namedtuple make their methods so, all through
    megatron-core's imports): CPython flags a KeyboardInterrupt leaving such code as unhandled, and under
    `python -m` then ends the process by SIGINT although one_line_errors exited with 130."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import os, signal\n"
        "from megatron_simreg.cli import one_line_errors\n"
        "with one_line_errors('demo'):\n"
        "    exec('os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10**7): pass')\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))
    done = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (130, "demo: interrupted by SIGINT (exit code 130)\n")


def test_ctrl_c_before_megatron_trainings_signal_handler_is_130_not_143():
    """megatron.training takes Ctrl-C as SIGTERM once its handler is in place; before, it is Ctrl-C (while
    one_line_errors has SIGTERM raise, as train.py runs it)."""
    from megatron_simreg.cli import one_line_errors
    from megatron_simreg.megatron_entry import _InterruptedEarly, _sigint_as_sigterm

    with one_line_errors("training stopped"), pytest.raises(_InterruptedEarly) as stop:
        _sigint_as_sigterm([], signal.SIGINT, None)
    assert stop.value.code == 130


def test_every_tool_answers_a_broken_input_in_one_line(tmp_path, capsys):
    """In this process (each tool's main), as their own processes would: SystemExit with the one line."""
    from export_hf_cli import export_cli

    from megatron_simreg import evaluate, study, token_frequency

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    save_config(load_config("configs/tiny-llama.yaml"), str(tmp_path / "run"))
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("zz")
    with pytest.raises(SystemExit, match=r"^evaluate: .*zz") as stop:
        evaluate.main(["--checkpoint", str(checkpoints), "--tasks", "offline", "--output", str(tmp_path / "eval")])
    assert "\n" not in str(stop.value.code)
    message = export_cli("--checkpoint", str(checkpoints), "--output", str(tmp_path / "hf"))
    assert message.startswith("export_hf: ") and "zz" in message and "\n" not in message, message
    assert not (tmp_path / "hf").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("config: configs/tiny-llama.yaml\nseeds: [1, 2\n")
    with pytest.raises(SystemExit) as stop:
        study.main([str(broken)])
    message = str(stop.value.code)
    assert message.startswith(f"study: study '{broken}' is not valid YAML at line 3") and "\n" not in message
    with pytest.raises(SystemExit) as stop:  # the data check training makes, for a tool reading data too
        token_frequency.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "frequencies")])
    message = str(stop.value.code)
    assert message.startswith(f"token_frequency: data {tmp_path / 'missing'}.bin") and "not found" in message, message
    assert "\n" not in message and not (tmp_path / "frequencies").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_during_an_export_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    from export_hf_cli import export_cli

    import megatron_simreg.export_hf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C raises it while the weights are written

    monkeypatch.setattr(megatron_simreg.export_hf, "export", interrupted)
    assert export_cli("--checkpoint", str(tmp_path), "--output", str(tmp_path / "hf")) == "130"
    assert capsys.readouterr().err == "export_hf: interrupted by SIGINT (exit code 130)\n"


def test_the_study_records_the_cells_ctrl_c_and_exits_130(tmp_path, capsys):
    """Ctrl-C to the study's process group (here: the study's main in this process, and its cell): the cell saves
    and exits 130, the study records that and exits 130 in one line."""
    from megatron_simreg import study

    for suffix in (".bin", ".idx"):
        (tmp_path / f"data{suffix}").write_text("")
    cell = tmp_path / "cell.py"  # stands for a training process: it stops on SIGINT with exit code 130
    cell.write_text("import signal, sys, time\n"
                    "signal.signal(signal.SIGINT, lambda *_: sys.exit(130))\n"
                    "print('ready', flush=True)\n"
                    "time.sleep(60)\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"config": "configs/tiny-llama.yaml", "seeds": [1], "out": str(tmp_path / "out"),
                                "set": {"data.prefix": str(tmp_path / "data")},
                                "variants": {"simreg": {"simreg.weight": 1}}, "launcher": f"{{python}} {cell}"}))
    found = []

    def ctrl_c():  # as a terminal sends it: to the study and to its cell
        found.append(_wait_for(tmp_path / "out", "train.log", "ready"))
        for child in psutil.Process().children():
            child.send_signal(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's Ctrl-C, as in a terminal
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(SystemExit) as stop:
            study.main([str(grid)])
    finally:
        signal.signal(signal.SIGINT, previous)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("study: ")]
    assert stop.value.code == 130 and lines == [
        "study: interrupted by SIGINT; simreg/seed1 stopped with exit code 130 (its train.log says why); "
        "run the same command to resume"], lines
    with open(os.path.join(found[0], "study.json")) as f:
        assert [a["returncode"] for a in json.load(f)["attempts"]] == [130]


def _wait_for(folder, name, text, timeout=60):
    """The folder under `folder` whose file `name` says `text`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for root, _, files in os.walk(folder):
            if name in files and text in open(os.path.join(root, name)).read():
                return root
        time.sleep(0.05)
    raise AssertionError(f"no {name} saying {text!r} under {folder}")


def launch(*command, cwd=ROOT):
    return subprocess.Popen([sys.executable, "-m", "megatron_simreg.launch", "--standalone", "--nproc-per-node", "2",
                             *command], cwd=cwd, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_until(process, text: str, times: int = 1) -> list[str]:
    output = []
    for line in process.stdout:
        output.append(line)
        if sum(text in seen for seen in output) == times:
            break
    return output


def test_sigterm_to_the_launcher_saves_and_exits_143(corpus, tmp_path):  # noqa: F811
    """Two processes of the local loop; SIGTERM to the launcher (as `kill` or a scheduler sends it) at iteration 1."""
    run_dir = tmp_path / "run"
    settings = [*TINY, "schedule.train_iters=40", "training.save_interval=100", "parallel.tensor=2",
                f"data.prefix={corpus}", f"logging.run_dir={run_dir}"]
    process = launch("-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
                     *[part for setting in settings for part in ("--set", setting)])
    output = read_until(process, " iteration 1/")
    process.send_signal(signal.SIGTERM)
    output += process.stdout.readlines()
    process.wait(timeout=300)
    text = "".join(output)
    assert process.returncode == 143 and "Traceback" not in text, (process.returncode, text[-5000:])
    assert [line for line in output if line.startswith("launch:")] == [
        "launch: the workers stopped on SIGTERM after saving; exit code 143, run the same command to resume\n"]
    stopped = [line for line in output if line.startswith("training stopped:")]
    assert len(stopped) == 1 and "received SIGTERM" in stopped[0], text[-3000:]
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert tracker.is_file() and int(tracker.read_text()) >= 1


def test_ctrl_c_to_the_launchers_process_group_reaches_the_workers_and_exits_130(tmp_path):
    """torchrun starts its workers in sessions of their own: Ctrl-C reaches them through the launcher. (A stand-in
    for training that stops on SIGINT with exit code 130; SIGTERM above trains.)"""
    worker = tmp_path / "worker.py"
    worker.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGINT, lambda *_: sys.exit(130))\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(60)\n")
    process = launch(str(worker))
    output = read_until(process, "ready", times=2)
    os.killpg(process.pid, signal.SIGINT)
    output += process.stdout.readlines()
    process.wait(timeout=60)
    assert process.returncode == 130 and [line for line in output if line.startswith("launch:")] == [
        "launch: the workers stopped on SIGINT after saving; exit code 130, run the same command to resume\n"], (
        process.returncode, "".join(output)[-3000:])
