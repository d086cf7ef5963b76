"""Checkpoint integrity and finding the checkpoint to load, in both training loops, export and evaluate.

Every save records each file's size and hash (checksums.json); a file damaged in place (zeros, random bytes) is
refused before any weight is loaded, naming the file and the latest earlier intact iteration. A `latest` file
naming a missing iteration offers the intact one; an explicit checkpoint.load holding no checkpoint is refused.
One small run per loop (iterations 2 and 4 saved) is copied by each test that damages it.
"""

import os
import random
import re
import shutil
import sys

import pytest
from distributed import run_distributed
from export_hf_cli import export_cli
from test_failures import stopped_worker
from test_megatron_training import megatron_training
from test_training import config, corpus, train_worker  # noqa: F401  (corpus is a fixture)

from megatron_simreg import checksums

SHORT = ["schedule.train_iters=4", "training.save_interval=2", "training.eval_interval=4"]
RESUME_2 = "the latest earlier intact iteration is 2: resume from it with --set checkpoint.load_iteration=2"


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811
    """The local loop's and megatron.training's run folders, each with iterations 2 and 4 saved."""
    folder = tmp_path_factory.mktemp("integrity")
    run_distributed(train_worker, 1, config(corpus, folder / "local", *SHORT))
    megatron_training(folder / "megatron", f"data.prefix={corpus}", *SHORT)
    return {"local": folder / "local", "megatron": folder / "megatron"}


def copied(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / run_dir.name)
    return tmp_path / run_dir.name


def damage(path, data: bytes) -> None:
    """Overwrite bytes of `path` from its middle on with `data`, where that changes them (zeros over zeros would
    not: an optimizer's state for padded vocabulary rows is zero); its size stays."""
    with open(path, "r+b") as f:
        offset = f.seek(os.path.getsize(path) // 2 - len(data) // 2)
        while f.read(len(data)) == data:
            offset += len(data)
        f.seek(offset)
        f.write(data)


ZEROS = bytes(64 * 1024)
RANDOM = random.Random(0).randbytes(64 * 1024)


def largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_both_loops_record_the_checksums_of_every_file_they_save(runs):
    for run_dir in runs.values():
        for iteration in (2, 4):
            folder = run_dir / "checkpoints" / f"iter_{iteration:07d}"
            manifest = (folder / checksums.MANIFEST).read_text()
            files = [p for p in folder.rglob("*") if p.is_file() and p.name != checksums.MANIFEST]
            assert len(files) >= 1 and all(f'"{p.relative_to(folder)}"' in manifest for p in files), manifest
            assert checksums.verify(str(folder), collective=False) == []


def test_a_local_checkpoint_damaged_in_place_is_refused_naming_the_file_and_the_intact_iteration(
        runs, corpus, tmp_path):  # noqa: F811
    """64 KiB of zeros, then of random bytes, in the middle of the latest file: resume and export refuse it in one
    line naming the file and iteration 2; nothing on disk changes (the metrics of iterations 1-4 stay)."""
    run_dir = copied(runs["local"], tmp_path)
    latest = run_dir / "checkpoints" / "iter_0000004" / "mp_rank_00_000" / "model_optim_rng.pt"
    metrics = (run_dir / "metrics.jsonl").read_text()
    for data in (ZEROS, RANDOM):
        damage(latest, data)
        message = run_distributed(stopped_worker, 1, config(corpus, run_dir, "schedule.train_iters=6"))[0]
        assert message == (f"CheckpointError: checkpoint file {latest} is corrupt (its content differs from the "
                           f"checksum saved with it); {RESUME_2}"), message
        assert (run_dir / "metrics.jsonl").read_text() == metrics
        assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "4"
    failed = export_cli("--checkpoint", str(run_dir / "checkpoints"), "--output", str(tmp_path / "hf"))
    assert f"checkpoint file {latest} is corrupt" in failed and "export it with --iteration 2" in failed, failed
    latest.unlink()  # a folder left incomplete
    failed = export_cli("--checkpoint", str(run_dir / "checkpoints"), "--output", str(tmp_path / "hf"))
    assert f"checkpoint file {latest} is missing; the latest earlier intact iteration is 2" in failed, failed
    assert not (tmp_path / "hf").exists()


def test_a_megatron_checkpoint_damaged_in_place_is_refused_naming_the_file_and_the_intact_iteration(
        runs, corpus, tmp_path):  # noqa: F811
    """Zeros in megatron.training's largest file: its resume stops before loading, in one line; random bytes in
    another file are found by the same check, which the wrapped load_checkpoint calls on every rank."""
    from megatron_simreg.checkpoint import RESUME, CheckpointError, verify_checkpoint

    run_dir = copied(runs["megatron"], tmp_path)
    folder = run_dir / "checkpoints" / "iter_0000004"
    largest = largest_file(folder)
    damage(largest, ZEROS)
    done = megatron_training(run_dir, f"data.prefix={corpus}", "schedule.train_iters=6", succeed=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("training stopped:")]
    assert lines and lines[0] == (f"training stopped: checkpoint file {largest} is corrupt (its content differs from "
                                  f"the checksum saved with it); {RESUME_2}"), done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    shutil.copy(runs["megatron"] / largest.relative_to(run_dir), largest)
    other = next(p for p in sorted(folder.rglob("*")) if p.is_file() and p != largest and p.stat().st_size > 1024)
    damage(other, RANDOM[: other.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint file {other} is corrupt .*; {RESUME_2}$"):
        verify_checkpoint(str(run_dir / "checkpoints"), 4, RESUME, collective=False)


def test_an_explicit_checkpoint_load_without_a_checkpoint_is_refused_before_any_work(
        runs, corpus, tmp_path, monkeypatch):  # noqa: F811
    """A typo in checkpoint.load (RUN/checkpoint) would train from scratch: both loops refuse it, naming the folder
    and what is wrong with it, and write nothing. Left unset, an empty save folder still starts from scratch."""
    from megatron_simreg.megatron_entry import pretrain

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # pretrain() sets Megatron's arguments there
    (tmp_path / "empty").mkdir()
    for load, problem in ((runs["local"] / "checkpoint", "the folder does not exist"),
                          (tmp_path / "empty", "it holds no latest_checkpointed_iteration.txt and no iter_* folders")):
        expected = f"no checkpoint at checkpoint.load={load}: {problem}; point it at a run's checkpoint folder"
        cfg = config(corpus, tmp_path / "run", f"checkpoint.load={load}")
        message = run_distributed(stopped_worker, 1, cfg)[0]
        assert message.startswith(f"FileNotFoundError: {expected}") and "\n" not in message, message
        with pytest.raises(SystemExit, match="^training stopped: " + re.escape(expected)):
            pretrain(cfg)
        assert not (tmp_path / "run").exists()


def test_a_latest_file_naming_a_missing_iteration_offers_the_intact_one(
        runs, corpus, tmp_path, monkeypatch):  # noqa: F811
    """The latest folder deleted, or the `latest` file saying 999 or 0, or gone: the local loop, megatron.training
    and export each name the problem and offer iteration 2 in their own words."""
    from megatron_simreg.megatron_entry import pretrain

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run_dir = copied(runs["local"], tmp_path)
    checkpoints = run_dir / "checkpoints"
    tracker = checkpoints / "latest_checkpointed_iteration.txt"
    shutil.rmtree(checkpoints / "iter_0000004")
    cfg = config(corpus, run_dir, "schedule.train_iters=6")
    message = run_distributed(stopped_worker, 1, cfg)[0]
    assert message == (f"CheckpointError: {tracker} names iteration 4, but there is no {checkpoints / 'iter_0000004'} "
                       "(saved: 2); the latest intact iteration is 2: resume from it with "
                       "--set checkpoint.load_iteration=2"), message
    tracker.write_text("999")
    with pytest.raises(SystemExit, match=f"^training stopped: {tracker} names iteration 999, .*; the latest intact "
                                         "iteration is 2: resume from it with --set checkpoint.load_iteration=2$"):
        pretrain(cfg)
    tracker.write_text("0")
    failed = export_cli("--checkpoint", str(checkpoints), "--output", str(tmp_path / "hf"))
    assert failed.startswith(f"export_hf: {tracker} names iteration 0, but there is no") and failed.endswith(
        "the latest intact iteration is 2: export it with --iteration 2"), failed
    tracker.unlink()  # iterations saved but none named the latest: not a run to start from scratch over
    failed = export_cli("--checkpoint", str(checkpoints), "--output", str(tmp_path / "hf"))
    assert failed == (f"export_hf: {checkpoints} holds iterations 2 but no latest_checkpointed_iteration.txt naming "
                      "the latest; the latest intact iteration is 2: export it with --iteration 2"), failed


def test_export_lists_the_saved_iterations_and_names_a_missing_folder(runs, tmp_path):
    checkpoints = runs["local"] / "checkpoints"
    failed = export_cli("--checkpoint", str(checkpoints), "--output", str(tmp_path / "hf"), "--iteration", "3")
    assert failed == f"export_hf: --iteration 3 is not saved in {checkpoints} (saved: 2, 4)"
    missing = runs["local"] / "checkpoint"
    failed = export_cli("--checkpoint", str(missing), "--output", str(tmp_path / "hf"))
    assert failed.startswith(f"export_hf: no checkpoint at --checkpoint {missing}: the folder does not exist"), failed


def test_evaluate_offers_what_it_can_do_with_an_intact_iteration(runs, tmp_path):
    """evaluate has no --iteration: its messages about a damaged checkpoint or `latest` file say to export the
    intact iteration and evaluate that folder."""
    from megatron_simreg.checkpoint import CheckpointError
    from megatron_simreg.evaluate import hugging_face_folder

    run_dir = copied(runs["local"], tmp_path)
    checkpoints = run_dir / "checkpoints"
    damage(largest_file(checkpoints / "iter_0000004"), ZEROS)
    offers = []
    for latest in ("4", "zz"):
        (checkpoints / "latest_checkpointed_iteration.txt").write_text(latest)
        with pytest.raises(CheckpointError) as refused:
            hugging_face_folder(str(checkpoints), str(tmp_path / "hf"), None)
        offers.append(str(refused.value).rsplit("; ", 1)[1])
    assert offers == [
        "the latest earlier intact iteration is 2: export it with tools/export_hf.py --iteration 2 and evaluate its "
        "folder",
        "the latest intact iteration is 2: export it with tools/export_hf.py --iteration 2 and evaluate its folder",
    ]


def test_a_checkpoint_saved_without_checksums_loads_and_says_so(runs, tmp_path, capsys):
    from megatron_simreg.config import load_config
    from megatron_simreg.export_hf import load_merged_state

    run_dir = copied(runs["local"], tmp_path)
    folder = run_dir / "checkpoints" / "iter_0000004"
    (folder / checksums.MANIFEST).unlink()
    state = load_merged_state(str(run_dir / "checkpoints"), load_config(str(run_dir / "config.yaml")))
    assert "embedding.word_embeddings.weight" in state
    assert f"checkpoint {folder} has no checksums.json (saved without checksums): loading it unverified" in \
        capsys.readouterr().err


def checksum_worker(rank, world, folder):
    """Record and verify collectively: which files each rank hashed, and what each rank found after a change."""
    import torch.distributed as dist

    hashed = []
    file_hash = checksums.file_hash
    checksums.file_hash = lambda path: hashed.append(os.path.relpath(path, folder)) or file_hash(path)
    checksums.record(folder)
    recorded_by = list(hashed)
    if rank == 0:
        damage(os.path.join(folder, "b", "3.bin"), b"\1")
    dist.barrier()
    return recorded_by, checksums.verify(folder, collective=True)


def test_checksums_are_split_over_the_ranks_and_every_rank_gets_the_verdict(tmp_path):
    for index, size in enumerate((4000, 3000, 2000, 1000)):
        path = tmp_path / ("a" if index < 2 else "b") / f"{index}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(random.Random(index).randbytes(size))
    (rank0, found0), (rank1, found1) = run_distributed(checksum_worker, 2, str(tmp_path))
    assert sorted(rank0 + rank1) == ["a/0.bin", "a/1.bin", "b/2.bin", "b/3.bin"] and len(rank0) == len(rank1) == 2
    assert found0 == found1 == [f"checkpoint file {tmp_path / 'b' / '3.bin'} is corrupt (its content differs from "
                                "the checksum saved with it)"]
    (tmp_path / checksums.MANIFEST).write_text('{"files": ')  # cut short: the folder is not taken as intact
    problems = checksums.verify(str(tmp_path), collective=False)
    assert len(problems) == 1 and problems[0].startswith(f"checksum file {tmp_path / 'checksums.json'} is unreadable")
