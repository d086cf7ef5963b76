"""The one-shot GPU check, as far as a CPU runs it: its dry run lists and verifies every package the GPU machine
needs, launches that outlive their time are killed with all their descendants, the overall deadline holds,
each run gets a fresh work folder, and the production flags it trains with run through megatron.training."""

import os
import subprocess
import sys
import time

import psutil
import pytest
from installed_links import link_distributions

from megatron_simreg import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from megatron_simreg.data import prepare_corpus

    folder = tmp_path_factory.mktemp("corpus")
    text = folder / "texts.jsonl"
    text.write_text("".join('{"text": "a short document number %d."}\n' % i for i in range(20)))
    prefix = str(folder / "corpus_text_document")
    prepare_corpus([str(text)], prefix, progress=False)
    return prefix


def gpu_check_sh(*args):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["scripts/gpu_check.sh", *args], cwd=ROOT, env={**env, "PYTHON": sys.executable},
                          capture_output=True, text=True)


def test_dry_run_lists_every_package_and_finds_every_piece(small_corpus, tmp_path):
    """Before a GPU is lent: the dry run names each package the GPU machine needs with its version, imports every
    module the checks import, finds the data and writes the report skeleton (one section per check)."""
    report = tmp_path / "gpu-validation.md"
    done = gpu_check_sh("--dry-run", "--data", small_corpus, "--output", str(report), "--work", str(tmp_path / "w"))
    assert done.returncode == 0, done.stdout + done.stderr
    written = report.read_text()
    assert written.count("not run (dry run)") == 10 and "every piece imports and the data is there" in written
    needed = gpu_check.needed_distributions()
    for name in ("megatron-core", "mistral-common", "sentencepiece", "transformers", "safetensors", "pydantic"):
        assert f"{name} {needed[name]}" in done.stdout and f"{name} {needed[name]}" in written, name
    assert "torch " not in done.stdout.split("Packages")[1].split("\n")[0]  # the machine has torch
    missing = gpu_check_sh("--dry-run", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "other.md"),
                           "--work", str(tmp_path / "w2"))
    assert missing.returncode != 0 and "no dataset at" in missing.stdout


def test_the_listed_packages_are_all_the_gpu_machine_needs(small_corpus, tmp_path):
    """A machine with only torch, triton (and their dependencies) and the listed packages, made here from this
    environment's installed files: the bare interpreter, no site-packages but a folder of links to exactly those
    distributions, passes the dry run (every module the checks import imports there)."""
    machine = tmp_path / "site"
    link_distributions(machine, {*gpu_check.needed_distributions(), *gpu_check.requirement_closure(gpu_check.PROVIDED)})
    script = ("import sys; sys.path[:0] = sys.argv[1:3]; from megatron_simreg import gpu_check; "
              "sys.exit(gpu_check.main(sys.argv[3:]))")
    done = subprocess.run(
        [sys._base_executable, "-S", "-c", script, str(machine), ROOT, "--dry-run", "--data", small_corpus,
         "--output", str(tmp_path / "report.md"), "--work", str(tmp_path / "work")],
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        capture_output=True, text=True,
    )
    assert done.returncode == 0 and "every piece imports" in (tmp_path / "report.md").read_text(), done.stdout[-3000:]


def test_wheel_command_pins_each_listed_package():
    command = gpu_check.wheel_download_command()
    assert "--python-version 3.12" in command and "-d .whl" in command
    for name, version in gpu_check.needed_distributions().items():
        assert f" {name}=={version}" in command


def test_a_launch_past_its_time_is_killed_with_every_descendant():
    """torchrun starts each worker in a session of its own: killing the launcher's process group would leave
    the worker (which holds the GPU) running. Here a child starts a grandchild the same way."""
    child = ("import subprocess, sys, time\n"
             "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],\n"
             "                          start_new_session=True)\n"
             "print(worker.pid, flush=True)\n"
             "time.sleep(300)\n")
    start = time.monotonic()
    with pytest.raises(gpu_check.OutOfTime, match="killed after"):
        gpu_check._run([sys.executable, "-c", child], gpu_check.Deadline(600), timeout=5)
    assert time.monotonic() - start < 60
    orphans = [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(300)" in " ".join(p.info["cmdline"] or [])]
    assert not [p for p in orphans if p.status() != psutil.STATUS_ZOMBIE], "a descendant survived"


def test_checks_past_the_deadline_are_reported_not_run(tmp_path):
    """The overall deadline caps each launch and skips what cannot start; the report is rewritten after each."""
    report = tmp_path / "report.md"
    ran = []

    def slow(deadline):
        ran.append("slow")
        return gpu_check._run([sys.executable, "-c", "import time; time.sleep(300)"], deadline, timeout=300)

    def quick(deadline):
        ran.append("quick")
        return "done"

    sections = ["# report"]
    start = time.monotonic()
    failed = gpu_check.run_checks([("quick", quick), ("slow", slow), ("after", quick)], gpu_check.Deadline(3),
                                  sections, str(report))
    assert time.monotonic() - start < 60 and ran == ["quick", "slow"] and failed == 2
    written = report.read_text()
    assert "## quick\n\ndone" in written and "killed after" in written
    assert "## after\n\nnot run: the overall deadline had passed" in written


def test_each_run_gets_a_fresh_work_folder(small_corpus, tmp_path):
    """A second run must not resume from the first one's checkpoints: a work folder that holds anything is refused
    before any work (the default is a new folder per run, stamped with its start)."""
    used = tmp_path / "used"
    (used / "straight").mkdir(parents=True)
    done = gpu_check_sh("--dry-run", "--data", small_corpus, "--work", str(used), "--output", str(tmp_path / "r.md"))
    assert done.returncode == 2 and "is not empty" in done.stderr and not (tmp_path / "r.md").exists()


def test_production_flags_train_through_megatron_training(tmp_path):
    """base.yaml's flags that need no Transformer Engine (overlapped gradient reduce and parameter gather, fused
    cross-entropy, manual GC), which the GPU check trains with, run through megatron.training on a CPU and train
    as the run without them: the first step sees identical weights and inputs, so its loss differs only by the
    fused cross-entropy's fp32 summation order (1e-6 relative bounds a few ulps of a mean over tokens); after
    it, bf16 roundings of the updated weights may flip and move later losses by up to one bf16 ulp (2^-7)."""
    from test_megatron_training import megatron_losses, megatron_training

    from megatron_simreg.data import prepare_corpus

    text = tmp_path / "texts.jsonl"
    text.write_text("".join('{"text": "document %d: the quick brown fox jumps over the lazy dog."}\n' % i
                            for i in range(200)))
    prepare_corpus([str(text)], str(tmp_path / "corpus_text_document"), progress=False)
    settings = [f"data.prefix={tmp_path / 'corpus_text_document'}", "schedule.train_iters=4", "schedule.warmup_steps=1",
                "adagc.warmup_steps=1", "training.precision=bf16", "parallel.distributed_optimizer=true",
                "training.eval_interval=1000", "training.save_interval=1000"]
    flags = f"megatron.extra_args=[{','.join(gpu_check.PRODUCTION_FLAGS)}]"
    plain = megatron_losses(megatron_training(tmp_path / "plain", *settings))
    production = megatron_losses(megatron_training(tmp_path / "production", *settings, flags))
    assert sorted(production) == sorted(plain) == [1, 2, 3, 4]
    assert production[1][0] == pytest.approx(plain[1][0], rel=1e-6)
    for iteration in (2, 3, 4):
        assert production[iteration][0] == pytest.approx(plain[iteration][0], rel=2**-7), iteration
    assert production[4][0] < production[1][0]
