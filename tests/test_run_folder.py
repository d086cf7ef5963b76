"""The run folder and the files the tools write: one run at a time in a run folder, in both loops; a restart
without a checkpoint starts the metrics afresh; log files get plain lines, not progress-bar redraws. Exports
(tools/export_hf.py, evaluate's hf/ folders) have the umask's modes, leave no temporary folder when stopped, and
refuse an output they cannot replace; prepare_data refuses a folder as its output prefix."""

import contextlib
import fcntl
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
from export_hf_cli import export_cli
from test_training import TINY, config, corpus, single_process_environment  # noqa: F401  (corpus is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = ["schedule.train_iters=1000", "training.save_interval=1000", "training.eval_interval=1000"]


def holder(folder) -> dict | None:
    try:
        return json.loads((folder / ".lock").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def started(command, run_dir, log):
    """A training process of its own (no torchrun), once it holds the run folder; killed if the test fails."""
    env = dict(single_process_environment(), PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 300
        while (holder(run_dir) or {}).get("pid") != process.pid:
            assert process.poll() is None and time.time() < deadline, f"exit code {process.returncode}"
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def local_command(*settings):
    return [sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
            *(f"--set={s}" for s in TINY + list(settings))]


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


def local_start(run_dir) -> str:
    return holder(run_dir)["started"]


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(corpus, tmp_path, capfd, monkeypatch):  # noqa: F811
    """The local loop holds the run folder: megatron.training's entry started on it, and the local loop started with
    its checkpoint folder, stop before any work in one line naming the holder. The holder, stopped by SIGTERM, logged
    plain lines (no progress-bar redraws in its log), its stop line stands on its own line, and it left no lock
    to take over. The lock file of a run killed with -9 is taken over, in one line per folder."""
    run_dir, data = tmp_path / "run", f"data.prefix={corpus}"
    settings = [data, f"logging.run_dir={run_dir}", *LONG]
    log = tmp_path / "local.log"
    with open(log, "w") as stderr, started(local_command(*settings), run_dir, stderr) as local:
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert local.poll() is None
            time.sleep(0.05)
        saved_config = (run_dir / "config.yaml").stat().st_mtime_ns

        from megatron_simreg.megatron_entry import pretrain

        monkeypatch.setattr(sys, "argv", list(sys.argv))  # pretrain() sets Megatron's arguments there
        with pytest.raises(SystemExit) as refused:  # megatron.training's entry, before Megatron starts
            pretrain(config(corpus, run_dir, *LONG))
        assert str(refused.value.code) == (f"training stopped: {in_use('logging.run_dir', run_dir, local)}"
                                           f"{local_start(run_dir)}: wait for it, stop it, or set another "
                                           "logging.run_dir")

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
    RunFolders(str(run_dir), str(run_dir / "checkpoints")).release()  # (reading .lock here would release it)
    lines = capfd.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"logging.run_dir={run_dir}",
                                                      f"checkpoint.save={run_dir / 'checkpoints'}"], lines
    for line in lines:
        assert f"taking over the lock of pid {dead.pid} on host {socket.gethostname()} (since then)" in line
        assert line.endswith("which ended without releasing it")
    assert holder(run_dir) is None


def refused_before_a_process_group(rank, world, run_dir):
    import torch.distributed as dist

    from megatron_simreg.run_folder import FolderInUse, RunFolders

    dist.destroy_process_group()  # as megatron.training's ranks are before Megatron starts: only torchrun's store
    try:
        RunFolders(run_dir, os.path.join(run_dir, "checkpoints"))
    except FolderInUse as error:
        return str(error)
    return None


def test_every_rank_of_a_refused_megatron_launch_stops_before_megatron_starts(tmp_path):
    """Rank 0 decides and the others learn it through torchrun's store, so all of them stop at once; a rank left to
    Megatron's start-up would ignore torchrun's SIGTERM (Megatron's handler) and hold the launch 30 s more."""
    from megatron_simreg.run_folder import RunFolders

    with RunFolders(str(tmp_path), str(tmp_path / "checkpoints")):
        messages = run_distributed(refused_before_a_process_group, 2, str(tmp_path))
    assert messages[0] == messages[1], messages
    assert messages[0].startswith(f"logging.run_dir={tmp_path} is in use by pid {os.getpid()} on host "), messages


def train_worker(rank, world, cfg):
    from megatron_simreg.local_loop import train

    return train(cfg)


@pytest.fixture(scope="module")
def restarted(corpus, tmp_path_factory):  # noqa: F811
    """A run killed at iteration 5 before its first checkpoint, started again and run to 3 (saved)."""
    run_dir = tmp_path_factory.mktemp("restarted")
    killed = [{"split": "train", "iteration": i, "tokens": 128 * i, "lm loss": 10.0} for i in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in killed))
    run_distributed(train_worker, 1, config(corpus, run_dir, "schedule.train_iters=3", "training.eval_interval=3"))
    return run_dir


def test_a_restart_before_the_first_checkpoint_keeps_one_metrics_record_per_iteration(restarted):
    """It starts at 0, so the killed run's records go and each iteration is logged once."""
    records = [json.loads(line) for line in (restarted / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("valid", 3)]
    assert all(r["lm loss"] != 10.0 for r in records)


def partials(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".partial"))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exports_have_the_modes_the_umask_gives(restarted, tmp_path, umask):
    from megatron_simreg.evaluate import hugging_face_folder

    checkpoints = str(restarted / "checkpoints")
    previous = os.umask(umask)
    try:
        assert export_cli("--checkpoint", checkpoints, "--output", str(tmp_path / "hf")) is None
        evaluated = hugging_face_folder(checkpoints, str(tmp_path / "eval" / "run" / "hf"), None)
    finally:
        os.umask(previous)
    for folder in (str(tmp_path / "hf"), evaluated):
        modes = {os.path.relpath(path, folder): (os.path.isdir(path), os.stat(path).st_mode & 0o777)
                 for root, dirs, files in os.walk(folder) for path in [root] + [os.path.join(root, f) for f in files]}
        assert "model.safetensors" in modes
        for path, (is_dir, mode) in modes.items():
            assert mode == (0o777 if is_dir else 0o666) & ~umask, (path, oct(mode))


def test_sigterm_mid_export_and_a_killed_exports_leftovers_leave_no_partial_folder(restarted, tmp_path, capsys,
                                                                                    monkeypatch):
    """SIGTERM while the export is written (at its last file): exit 143 in one line, its temporary folder removed.
    The temporary folder of an export killed with -9 is removed by the next export; one another export is writing
    (locked) is left alone."""
    import megatron_simreg.export_hf as export_hf

    checkpoints, output = str(restarted / "checkpoints"), tmp_path / "hf"
    write_tokenizer = export_hf._write_tokenizer

    def write_then_receive_sigterm(*args):
        write_tokenizer(*args)
        assert len(partials(tmp_path)) == 1
        os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(signum, frame):  # instead of SIGTERM's default, which would end the test session
        raise AssertionError("the export did not handle SIGTERM")

    monkeypatch.setattr(export_hf, "_write_tokenizer", write_then_receive_sigterm)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert export_cli("--checkpoint", checkpoints, "--output", str(output)) == "143"
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the export's handler is gone once it stopped
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == (
        f"export_hf: interrupted; nothing was written to {output} (the partial export was removed)\n")
    assert partials(tmp_path) == [] and not output.exists()
    monkeypatch.undo()

    killed, writing = tmp_path / ".hf.killed.partial", tmp_path / ".hf.writing.partial"
    for folder in (killed, writing):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    held = os.open(writing, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a live export holds its temporary folder
        assert export_cli("--checkpoint", checkpoints, "--output", str(output)) is None
    finally:
        os.close(held)
    assert partials(tmp_path) == [writing.name] and (output / "model.safetensors").is_file()


def test_an_export_output_that_cannot_be_replaced_is_refused_before_the_work(restarted, tmp_path, monkeypatch):
    import megatron_simreg.export_hf as export_hf

    def the_work(*args, **kwargs):
        raise AssertionError("the export started")

    checkpoints = str(restarted / "checkpoints")
    monkeypatch.setattr(export_hf, "load_merged_state", the_work)
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    for output in (".", str(here)):
        assert export_cli("--checkpoint", checkpoints, "--output", output) == (
            f"export_hf: --output {output} is the current directory, which an export cannot replace: give a folder "
            f"inside it, e.g. --output {os.path.join(output, 'hf')}")
    mount = tmp_path / "mounted"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: path == str(mount))
    message = export_cli("--checkpoint", checkpoints, "--output", str(mount))
    assert message is not None and f"--output {mount} is a mount point, which an export cannot replace" in message
    assert sorted(os.listdir(tmp_path)) == ["empty", "mounted"] and os.listdir(here) == []


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
