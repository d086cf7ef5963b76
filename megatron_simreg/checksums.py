"""Checksums of a checkpoint's files, recorded at save and verified before loading.

    record(folder)                   # after every file of the folder is written: writes folder/checksums.json
    problems = verify(folder, True)  # [] when every file matches, None when the folder has no manifest

A checkpoint overwritten in place (zeros from a failing disk, another job's bytes) may still load: torch.load
reads the damaged tensors as numbers and training goes on from them. The manifest holds each file's size and
xxh3-64 hash (several GB/s, faster than the disk wrote the file: see `megatron_simreg/bench/checksum.py`).
It knows nothing of the layout, so the local loop's `torch` files and megatron.training's `torch_dist`
folders are covered alike. Collectively (every rank of the process group calling), the files are split over
the ranks, so a large checkpoint is not read by one rank alone.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch.distributed as dist
import xxhash

MANIFEST = "checksums.json"
CHUNK = 16 * 1024 * 1024


def file_hash(path: str) -> str:
    digest = xxhash.xxh3_64()
    buffer = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


def record(folder: str) -> None:
    """Write `folder`/checksums.json for every file in `folder` (collective: call it on every rank)."""
    files = _shared(lambda: _listing(folder))
    hashes = _gathered({path: file_hash(os.path.join(folder, path)) for path in _share(files)})
    if _rank() == 0:
        manifest = {"hash": "xxh3_64", "files": {path: {"size": size, "xxh3_64": hashes[path]}
                                                 for path, size in sorted(files.items())}}
        partial = os.path.join(folder, MANIFEST + ".partial")
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.replace(partial, os.path.join(folder, MANIFEST))
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def recording(folder: str):
    """Around a save into `folder` by another writer (megatron.training's): the manifest of an earlier save there
    goes first, and the new one is recorded once every rank has written (collective)."""
    if _rank() == 0 and os.path.isfile(os.path.join(folder, MANIFEST)):
        os.remove(os.path.join(folder, MANIFEST))
    yield
    if dist.is_initialized():
        dist.barrier()
    record(folder)


def verify(folder: str, collective: bool) -> list[str] | None:
    """What differs from the manifest, one phrase per file naming it ([]: nothing); None without a manifest.
    Collective (every rank calling, each hashing its share; all get the same answer) or by this process alone."""
    collective = collective and dist.is_initialized()
    recorded = _shared(lambda: _recorded(folder)) if collective else _recorded(folder)
    if recorded is None or isinstance(recorded, str):
        return None if recorded is None else [recorded]
    problems = {}
    sizes = {path: size for path, (size, _) in recorded.items()}
    for path in _share(sizes) if collective else sizes:
        full = os.path.join(folder, path)
        if not os.path.isfile(full):
            problems[path] = f"checkpoint file {full} is missing"
        elif os.path.getsize(full) != sizes[path]:
            problems[path] = (f"checkpoint file {full} is corrupt (its size is {os.path.getsize(full):,} bytes; "
                              f"{sizes[path]:,} were saved)")
        elif file_hash(full) != recorded[path][1]:
            problems[path] = f"checkpoint file {full} is corrupt (its content differs from the checksum saved with it)"
    if collective:
        problems = _gathered(problems)
    return [problems[path] for path in sorted(problems)]


def _recorded(folder: str) -> dict[str, tuple[int, str]] | str | None:
    """The manifest: relative path -> (size, hash); None when there is none, a phrase saying why it is unreadable."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            return {name: (entry["size"], entry["xxh3_64"]) for name, entry in json.load(f)["files"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"checksum file {path} is unreadable ({error})"


def _listing(folder: str) -> dict[str, int]:
    """Relative path -> size of every file under `folder` but the manifest."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), folder)
            if path not in (MANIFEST, MANIFEST + ".partial"):
                files[path] = os.path.getsize(os.path.join(folder, path))
    return files


def _share(files: dict[str, int]) -> list[str]:
    """This rank's files: the largest first, each to the rank with the fewest bytes so far (alike on every rank)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    load, mine = [0] * world, []
    for path in sorted(files, key=lambda path: (-files[path], path)):
        rank = load.index(min(load))
        load[rank] += files[path] or 1
        if rank == _rank():
            mine.append(path)
    return mine


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _shared(compute):
    """`compute()` on rank 0, its result on every rank."""
    if not dist.is_initialized():
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(part: dict) -> dict:
    """Every rank's `part`, merged, on every rank."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for each in parts for key, value in each.items()}
