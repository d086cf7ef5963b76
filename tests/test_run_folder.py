"""One run at a time in a run folder, in both loops; a restart without a checkpoint starts the metrics afresh; log
files get plain lines, not progress-bar redraws; prepare_data refuses a folder as its output prefix."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from distributed import run_distributed
from test_training import TINY, config, corpus, single_process_environment  # noqa: F401  (corpus is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = ["schedule.train_iters=1000", "training.save_interval=1000", "training.eval_interval=1000"]


def holder(folder) -> dict | None:
    try:
        return json.loads((folder / ".lock").read_text())
    except (OSError, ValueError):
        return None


def start(command, run_dir, log):
    """A training process of its own (no torchrun), once it holds the run folder."""
    env = dict(single_process_environment(), PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 300
    while (holder(run_dir) or {}).get("pid") != process.pid:
        assert process.poll() is None and time.time() < deadline, f"exit code {process.returncode}"
        time.sleep(0.05)
    return process


def local_command(*settings):
    return [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
            *(f"--set={s}" for s in TINY + list(settings))]


def megatron_command(*settings):
    return [sys.executable, os.path.join("tests", "megatron_training_on_cpu.py"), "configs/tiny-llama.yaml",
            *TINY, *settings]


def refused_worker(rank, world, cfg):
    """The local loop's train(): the one-line reason it stopped."""
    from megatron_simreg.local_loop import train
    from megatron_simreg.run_folder import FolderInUse

    try:
        train(cfg)
    except FolderInUse as error:
        return str(error)
    return None


def in_use(key, folder, process):
    return f"{key}={folder} is in use by pid {process.pid} on host {socket.gethostname()} since "


def test_a_second_run_in_a_run_folder_is_refused_and_a_killed_runs_lock_is_taken_over(corpus, tmp_path, capfd):  # noqa: F811
    """The local loop holds the run folder: megatron.training started on it, and the local loop started with its
    checkpoint folder, stop before any work in one line naming the holder. The holder, stopped by SIGTERM, logged
    plain lines (no progress-bar redraws in its log), its stop line stands on its own line, and it left no lock
    to take over. The lock file of a run killed with -9 is taken over, in one line per folder."""
    run_dir, data = tmp_path / "run", f"data.prefix={corpus}"
    settings = [data, f"logging.run_dir={run_dir}", *LONG]
    log = tmp_path / "local.log"
    with open(log, "w") as stderr:
        local = start(local_command(*settings), run_dir, stderr)
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert local.poll() is None
            time.sleep(0.05)
        saved_config = (run_dir / "config.yaml").stat().st_mtime_ns

        second = subprocess.run(megatron_command(*settings), cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env=dict(single_process_environment(), PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert second.stderr.strip().splitlines()[-1].startswith(
            "training stopped: " + in_use("logging.run_dir", run_dir, local)), second.stderr[-3000:]
        assert "wait for it, stop it, or set another logging.run_dir" in second.stderr

        elsewhere = config(corpus, tmp_path / "other", f"checkpoint.save={run_dir / 'checkpoints'}")
        message = run_distributed(refused_worker, 1, elsewhere)[0]
        assert message.startswith(in_use("checkpoint.save", run_dir / "checkpoints", local)), message
        assert not (tmp_path / "other" / "config.yaml").exists()

        assert (run_dir / "config.yaml").stat().st_mtime_ns == saved_config
        local.send_signal(signal.SIGTERM)
        assert local.wait(timeout=300) == 143
    text = log.read_text()
    assert "\r" not in text and "Traceback" not in text, text[-3000:]
    stops = [line for line in text.split("\n") if "training stopped" in line]
    assert len(stops) == 1 and stops[0].startswith("training stopped: received SIGTERM"), text[-3000:]
    assert holder(run_dir) is None and holder(run_dir / "checkpoints") is None  # released: nothing to take over

    dead = subprocess.Popen(["true"])
    dead.wait()
    for folder in (run_dir, run_dir / "checkpoints"):  # what a run killed with -9 leaves: its name, no lock
        (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))

    from megatron_simreg.run_folder import RunFolders

    capfd.readouterr()
    with RunFolders(str(run_dir), str(run_dir / "checkpoints")):
        assert holder(run_dir)["pid"] == os.getpid()
    lines = capfd.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"logging.run_dir={run_dir}",
                                                      f"checkpoint.save={run_dir / 'checkpoints'}"], lines
    for line in lines:
        assert f"taking over the lock of pid {dead.pid} on host {socket.gethostname()} (since then)" in line
        assert line.endswith("which ended without releasing it")
    assert holder(run_dir) is None


def train_worker(rank, world, cfg):
    from megatron_simreg.local_loop import train

    return train(cfg)


def test_a_restart_before_the_first_checkpoint_keeps_one_metrics_record_per_iteration(corpus, tmp_path):  # noqa: F811
    """A run killed at iteration 5 before any checkpoint, started again: it starts at 0, so the killed run's
    records go and each iteration is logged once."""
    killed = [{"split": "train", "iteration": i, "tokens": 128 * i, "lm loss": 10.0} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in killed))
    run_distributed(train_worker, 1, config(corpus, tmp_path, "schedule.train_iters=3", "training.eval_interval=3"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("valid", 3)]
    assert all(r["lm loss"] != 10.0 for r in records)


def prepare_data_cli(*argv):
    spec = importlib.util.spec_from_file_location("prepare_data_tool", os.path.join(ROOT, "tools", "prepare_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as stop:
        tool.main(list(argv))
    return str(stop.value.code)


def test_prepare_data_refuses_a_folder_as_output_prefix(tmp_path):
    """`--output-prefix some/folder/` (or an existing folder) would write hidden .bin, .idx, .stats.json in it."""
    text = tmp_path / "texts.jsonl"
    text.write_text(json.dumps({"text": "a document"}) + "\n")
    folder = tmp_path / "data"
    folder.mkdir()
    for prefix in (f"{folder}/", str(folder), f"{tmp_path}/new/"):
        message = prepare_data_cli("--input", str(text), "--output-prefix", prefix, "--quiet")
        assert message == (f"prepare_data: --output-prefix={prefix} is a folder, not a file prefix: name the files in "
                           f"it, e.g. --output-prefix={os.path.join(prefix, 'corpus')} (writes "
                           f"{os.path.join(prefix, 'corpus')}.bin, .idx and .stats.json)"), message
    assert os.listdir(folder) == [] and not (tmp_path / "new").exists()
