"""Host memory of a Hugging Face import: `python -m megatron_simreg.bench.import_memory [--against CHECKOUT]`.

Writes a random bf16 Llama (transformers, from a config) in safetensors shards of `--shard-mb`, then runs
`python -m megatron_simreg.import_hf` on it in a child process for each layout, sampling the child's
/proc/PID/status every few milliseconds: peak resident memory (VmHWM) and peak anonymous memory (RssAnon,
what the process itself holds, as opposed to page cache it maps from files, which the kernel can reclaim).
A child that only imports the libraries gives the baseline both are read against. `--against` also measures
the importer of another checkout (e.g. `git worktree add /tmp/before main`), in the same run. The children run
with glibc's fixed mmap threshold (bench/memory.py), so freed tensors leave the resident set.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from megatron_simreg.bench.memory import MMAP_ENV
from megatron_simreg.study import machine

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
LIBRARIES = ("import torch, transformers, safetensors.torch, megatron.core.dist_checkpointing, "
             "megatron_simreg.import_hf, megatron_simreg.model")  # what an import loads before its first tensor


def write_model(folder: str, hidden: int, layers: int, shard_mb: int) -> int:
    """A random bf16 Llama with the default tokenizer, in shards of at most `shard_mb`; its size in bytes."""
    import transformers

    from megatron_simreg.data import default_tokenizer_path
    from megatron_simreg.hf_tokenizer import write_tokenizer

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 256), max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=f"{shard_mb}MB")
    write_tokenizer(default_tokenizer_path(), folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peaks(command: list[str], checkout: str) -> dict[str, int]:
    """Peak VmHWM and RssAnon (bytes) of `command`, run with `checkout` first on the path, sampled until it ends."""
    env = {**os.environ, MMAP_ENV: "65536", "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(command, env=env, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    highest = {"VmHWM": 0, "RssAnon": 0}
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as status:
                for line in status:
                    name, _, value = line.partition(":")
                    if name in highest:
                        highest[name] = max(highest[name], int(value.split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.002)
    if child.wait():
        raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    return highest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="the Llama's hidden size (FFN 11/4 of it)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard-mb", type=int, default=100, help="the safetensors shards' size limit, in MB")
    parser.add_argument("--layouts", nargs="+", default=["torch", "torch_dist"], choices=["torch", "torch_dist"])
    parser.add_argument("--against", help="another checkout whose importer is measured too (e.g. main's)")
    parser.add_argument("--dir", default=None, help="where to write the model and imports (default: temporary)")
    args = parser.parse_args(argv)
    checkouts = {"this checkout": HERE} | ({f"{args.against}": os.path.abspath(args.against)} if args.against else {})
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        size = write_model(os.path.join(folder, "hf"), args.hidden, args.layers, args.shard_mb)
        shards = sorted(os.path.getsize(os.path.join(folder, "hf", name))
                        for name in os.listdir(os.path.join(folder, "hf")) if name.endswith(".safetensors"))
        base = peaks([sys.executable, "-c", LIBRARIES], HERE)
        rows = []
        for name, checkout in checkouts.items():
            for layout in args.layouts:
                output = os.path.join(folder, f"import-{len(rows)}")
                found = peaks([sys.executable, "-m", "megatron_simreg.import_hf", "--input", os.path.join(folder, "hf"),
                               "--output", output, "--format", layout, "--set", "training.precision=bf16"], checkout)
                rows.append((name, layout, found))
    largest = shards[-1]
    print(f"# bf16 Llama of {size / 1e6:.0f} MB in {len(shards)} shards (largest {largest / 1e6:.0f} MB), "
          f"{machine()}; libraries alone: {base['VmHWM'] / 1e9:.2f} GB resident, {base['RssAnon'] / 1e9:.2f} GB "
          "anonymous")
    print("| importer | layout | peak resident above the libraries | peak anonymous above the libraries |")
    print("|---|---|---|---|")
    for name, layout, found in rows:
        resident, anonymous = found["VmHWM"] - base["VmHWM"], found["RssAnon"] - base["RssAnon"]
        print(f"| {name} | {layout} | {resident / 1e6:.0f} MB = {resident / size:.2f} model "
              f"| {anonymous / 1e6:.0f} MB = {anonymous / size:.2f} model = {anonymous / largest:.2f} shards |")


if __name__ == "__main__":
    main()
