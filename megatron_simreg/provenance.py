"""Which code made a run, so that numbers of different code are never compared unawares.

The identity is a hash of the package's Python source (the code that runs) with the versions of torch and
megatron-core, not the git commit: a README or test edit makes a new commit but the same numbers, while an
uncommitted edit of a module makes new numbers under the same commit. The commit (and whether the package
had uncommitted changes) is recorded beside it for people; an installed package has the package version
there instead. Configs are not hashed: a run records its resolved config, which is compared on its own.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import subprocess

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# What makes the numbers: two runs whose identities agree on these keys ran the same code.
COMPARED = ("source", "torch", "megatron-core")


def source_identity(package_dir: str = PACKAGE_DIR) -> dict:
    """sha256 of the package's .py files (paths and contents; not an editor's swap file or a cache), and the git
    commit of its checkout if any."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, package_dir).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    identity = {"source": digest.hexdigest()}
    git = ["git", "-C", package_dir]
    try:
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        changes = subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True, text=True,
                                 check=True).stdout
        identity.update(commit=commit.strip(), uncommitted=bool(changes.strip()))
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: an installed package
        try:
            identity["version"] = importlib.metadata.version("megatron-simreg")
        except importlib.metadata.PackageNotFoundError:
            identity["version"] = "unknown"
    return identity


@functools.cache
def code_identity() -> dict:
    """This process's code: source_identity() and the library versions (read without importing them)."""
    return {**source_identity(), "torch": importlib.metadata.version("torch"),
            "megatron-core": importlib.metadata.version("megatron-core")}


def same_code(a: dict, b: dict) -> bool:
    return bool(a) and bool(b) and all(a.get(key) == b.get(key) for key in COMPARED)


def describe(identity: dict) -> str:
    """One line: commit (or version), source hash, library versions; "unknown code" for runs that recorded none."""
    if not identity:
        return "unknown code (not recorded)"
    if "commit" in identity:
        made = f"commit {identity['commit'][:10]}" + (" with uncommitted changes" if identity["uncommitted"] else "")
    else:
        made = f"megatron-simreg {identity.get('version')}"
    return (f"{made}, source sha256 {identity['source'][:12]}, torch {identity.get('torch')}, "
            f"megatron-core {identity.get('megatron-core')}")
