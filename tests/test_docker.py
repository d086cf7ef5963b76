"""docker/Dockerfile under NGC's pip constraints, without Docker: its own pip lines, read from the file, run in a
fresh venv where torch is already installed (as in the image) and PIP_CONSTRAINT holds the image's versions
(docker/ngc-25.10-constraints.txt). SLOW: it installs from PyPI (lm-eval[hf] pulls transformers, datasets,
pyarrow, ...): 8 min measured on 2 busy cores beside the Slurm tests."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys


def dockerfile_pip_commands(path="docker/Dockerfile") -> list[str]:
    """The `pip install` commands of the Dockerfile's RUN lines, in order."""
    text = re.sub(r"\\\n", " ", open(path).read())
    runs = [line[len("RUN "):] for line in text.splitlines() if line.startswith("RUN ")]
    return [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]


def torch_as_the_image_has_it(folder):
    """A folder holding links to the installed torch and its dependencies only (a .pth puts it on the path)."""
    os.makedirs(folder)
    names, seen = ["torch"], set()
    while names:
        name = re.split(r"[ ;<>=~!\[]", names.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # torch's CUDA wheels: not installed with the CPU build, not needed to import it
        seen.add(name)
        names += [r for r in dist.requires or [] if "extra ==" not in r]
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".." and not f.parts[0].endswith(".pth")}:
            source = dist.locate_file(top)
            if os.path.exists(source) and not os.path.exists(os.path.join(folder, top)):
                os.symlink(source, os.path.join(folder, top))
    return seen


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
    shipped = torch_as_the_image_has_it(str(tmp_path / "image"))
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
