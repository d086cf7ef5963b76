"""docker/Dockerfile under NGC's pip constraints, without Docker: its own pip lines, read from the file, run in a
fresh venv where torch is already installed (as in the image) and PIP_CONSTRAINT holds the image's versions
(docker/ngc-25.10-constraints.txt). Slow: it installs from PyPI (lm-eval[hf] pulls transformers, datasets,
pyarrow, ...): 111-144 s in `make test` on 2 cores, with pip's cache warm."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

from installed_links import link_distributions

from megatron_simreg.gpu_check import requirement_closure


def dockerfile_pip_commands(path="docker/Dockerfile") -> list[str]:
    """The `pip install` commands of the Dockerfile's RUN lines, in order."""
    text = re.sub(r"\\\n", " ", open(path).read())
    runs = [line[len("RUN "):] for line in text.splitlines() if line.startswith("RUN ")]
    return [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]


def test_dockerfile_installs_under_ngc_constraints(tmp_path):
    commands = dockerfile_pip_commands()
    assert commands and all("requirements.txt" not in c for c in commands), commands
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(os.path.isfile, files):
        os.makedirs(source / os.path.dirname(name), exist_ok=True)
        shutil.copy2(name, source / name)

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch as the image has it: links to the installed torch and its dependencies only, on the venv's path
    shipped = link_distributions(str(tmp_path / "image"), requirement_closure(["torch"]))
    with open(os.path.join(site, "image.pth"), "w") as f:
        f.write(str(tmp_path / "image") + "\n")
    constraints = tmp_path / "constraint.txt"
    lines = open("docker/ngc-25.10-constraints.txt").read().splitlines()
    torch = f"torch=={importlib.metadata.version('torch')}"
    constraints.write_text("\n".join(torch if line.startswith("torch==") else line for line in lines) + "\n")

    env = {**os.environ, "PIP_CONSTRAINT": str(constraints), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    for command in commands:
        done = subprocess.run(["bash", "-c", command.replace("python ", f"{python} ", 1)], cwd=source, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert "torch" in shipped
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], env=env, capture_output=True,
                               text=True, check=True).stdout
    assert re.search(r"^numpy==1\.26\.4$", installed, re.M), "numpy is the image's, not re-pinned"
    helped = subprocess.run([python, "-m", "megatron_simreg.train", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--config" in helped.stdout, helped.stderr[-3000:]
