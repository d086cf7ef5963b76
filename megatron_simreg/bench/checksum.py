"""What checkpoint checksums cost: `python -m megatron_simreg.bench.checksum [--megabytes 1024]`.

Writes a file of random bytes with torch.save (as a checkpoint save does: a uint8 tensor, no fsync), then reads
it back through xxh3-64 (checksums.py, recorded at every save and verified at every load) and through zlib's
CRC32 in the same 16 MiB chunks. The file was just written, so it is read from the page cache, as the checksums
of a checkpoint are at its save. Prints GB/s and each time as a fraction of the save's; the best of `--repeats`.
"""

import argparse
import os
import tempfile
import time
import zlib

import torch

from megatron_simreg.checksums import CHUNK, file_hash
from megatron_simreg.study import machine


def crc32(path: str) -> int:
    value, buffer = 0, memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            value = zlib.crc32(buffer[:size], value)
    return value


def best_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=1024, help="the file's size in MiB")
    parser.add_argument("--dir", default=None, help="where to write it (default: the temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (args.megabytes * 2**20,), dtype=torch.uint8, generator=generator)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, "bench.pt")
        seconds = {"torch.save (the checkpoint write)": best_seconds(lambda: torch.save(data, path), args.repeats),
                   "xxh3-64 (checksums.py)": best_seconds(lambda: file_hash(path), args.repeats),
                   "zlib CRC32": best_seconds(lambda: crc32(path), args.repeats)}
        size = os.path.getsize(path)
    save = seconds["torch.save (the checkpoint write)"]
    print(f"# {size / 1e9:.2f} GB file, {machine()}, best of {args.repeats}")
    print("| step | GB/s | time vs the save |")
    print("|---|---|---|")
    for name, time_taken in seconds.items():
        print(f"| {name} | {size / 1e9 / time_taken:.2f} | {time_taken / save:.2f}x |")


if __name__ == "__main__":
    main()
