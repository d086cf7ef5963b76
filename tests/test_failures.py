"""Bad outputs and inputs found before any work, in one line naming the thing and the fix; nothing written is lost:
unwritable output folders, a full disk during a save, corrupt checkpoints, truncated data, another TP layout."""

import os

import pytest
from distributed import run_distributed
from test_training import config, corpus  # noqa: F401  (corpus is a fixture)


def stopped_worker(rank, world, cfg):
    """train(), returning the one-line reason it stopped (None if it did not)."""
    from megatron_simreg.local_loop import train

    try:
        train(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def test_unwritable_output_folders_are_refused_before_any_work(corpus, tmp_path, monkeypatch):  # noqa: F811
    import sys

    from megatron_simreg.data import prepare_corpus
    from megatron_simreg.megatron_entry import pretrain

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # pretrain() sets Megatron's arguments there

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    cases = {"checkpoint.save": [f"checkpoint.save={blocker / 'checkpoints'}"], "logging.run_dir": []}
    for key, extra in cases.items():
        run_dir = tmp_path / "run" if extra else blocker / "run"
        message = run_distributed(stopped_worker, 1, config(corpus, run_dir, *extra))[0]
        assert message is not None and f"{key}={blocker}" in message and "is a file, not a folder" in message, message
        assert f"--set {key}=DIR" in message and "\n" not in message
        with pytest.raises(SystemExit, match=f"training stopped: {key}={blocker}.* is a file"):
            pretrain(config(corpus, run_dir, *extra))  # the megatron.training entry, before Megatron starts
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=f"--output-prefix={blocker}/data cannot be written"):
        prepare_corpus(["unused.jsonl"], str(blocker / "data" / "corpus"))
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="Permission denied"):
            prepare_corpus(["unused.jsonl"], str(locked / "corpus"))


def full_disk_worker(rank, world, run_dir):
    """Save iteration 1, then fail iteration 2 with ENOSPC (mocked) and with a file size limit (real)."""
    import errno
    import resource

    import torch

    from megatron_simreg import checkpoint, parallel
    from megatron_simreg.config import load_config

    cfg = load_config("configs/tiny-llama.yaml", ["schedule.train_iters=2"])
    parallel.initialize(cfg)
    try:
        state = {"model": {"weight": torch.randn(256, 256)}}
        checkpoint.save_checkpoint(run_dir, 1, state)
        messages = []
        write = checkpoint._ErrorRecordingFile.write

        def disk_full(self, data):
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error

        checkpoint._ErrorRecordingFile.write = disk_full
        try:
            checkpoint.save_checkpoint(run_dir, 2, state)
        except checkpoint.CheckpointError as error:
            messages.append(str(error))
        checkpoint._ErrorRecordingFile.write = write
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            checkpoint.save_checkpoint(run_dir, 2, state)
        except checkpoint.CheckpointError as error:
            messages.append(str(error))
        return messages
    finally:
        parallel.destroy()


def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "checkpoints"
    no_space, too_large = run_distributed(full_disk_worker, 1, str(run_dir))[0]
    assert no_space.startswith("no space left on ") and "mounted at" in no_space, no_space
    assert "the file size limit (ulimit -f)" in too_large
    for message in (no_space, too_large):
        assert "iteration 2 was not saved and the last checkpoint, iteration 1, is intact" in message
        assert "\n" not in message
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in run_dir.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_corrupt_checkpoints_name_the_file_and_the_earlier_intact_iteration(corpus, tmp_path):  # noqa: F811
    """Iteration 6 truncated, then overwritten with random bytes, then a garbage `latest`: resume and export each
    say which file is corrupt and offer iteration 3; resuming from 3 (checkpoint.load_iteration) retrains 4-6
    exactly, and exporting iteration 3 (--iteration) works."""
    import json
    import random
    import shutil

    from export_hf_cli import export_cli

    run_dir = tmp_path / "run"
    assert run_distributed(stopped_worker, 1, config(corpus, run_dir)) == [None]  # saves 3 and 6
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checkpoints = run_dir / "checkpoints"
    latest_file = checkpoints / "iter_0000006" / "mp_rank_00_000" / "model_optim_rng.pt"
    whole = latest_file.read_bytes()
    for corrupt in (whole[: len(whole) // 2], random.Random(0).randbytes(len(whole))):  # truncated, overwritten
        latest_file.write_bytes(corrupt)
        message = run_distributed(stopped_worker, 1, config(corpus, run_dir, "schedule.train_iters=8"))[0]
        assert f"checkpoint file {latest_file} is corrupt" in message and "\n" not in message, message
        assert "latest earlier intact iteration is 3: resume from it with --set checkpoint.load_iteration=3" in message
        failed = export_cli("--checkpoint", str(checkpoints), "--output", str(tmp_path / "hf"))
        assert (
            f"checkpoint file {latest_file} is corrupt" in failed and "export it with --iteration 3" in failed
        ), failed
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("\x00garbage")
    message = run_distributed(stopped_worker, 1, config(corpus, run_dir))[0]
    assert (
        f"{checkpoints / 'latest_checkpointed_iteration.txt'} is corrupt" in message and "saved here: 3, 6" in message
    )
    shutil.copy(run_dir / "metrics.jsonl", tmp_path / "first.jsonl")
    assert run_distributed(stopped_worker, 1, config(corpus, run_dir, "checkpoint.load_iteration=3")) == [None]
    again = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before = {r["iteration"]: r for r in first if r["split"] == "train"}
    after = {r["iteration"]: r for r in again if r["split"] == "train"}
    for iteration in (4, 5, 6):
        assert after[iteration]["lm loss"] == before[iteration]["lm loss"], iteration
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == "6"
    message = run_distributed(stopped_worker, 1, config(corpus, run_dir, "checkpoint.load_iteration=5"))[0]
    assert "checkpoint.load_iteration=5 is not saved" in message and "(saved: 3, 6)" in message
    assert export_cli("--checkpoint", str(checkpoints), "--output", str(tmp_path / "hf3"), "--iteration", "3") is None


def test_resuming_on_another_tensor_parallel_layout_is_explained_on_every_rank(corpus, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    assert run_distributed(stopped_worker, 1, config(corpus, run_dir, "schedule.train_iters=3")) == [None]
    messages = run_distributed(stopped_worker, 2, config(corpus, run_dir, "parallel.tensor=2"))
    for message in messages:
        assert message is not None and "saved with another parallel layout (tensor 1, pipeline 1, expert 1)" in message
        assert "this run has tensor 2, pipeline 1, expert 1" in message and "\n" not in message, message
