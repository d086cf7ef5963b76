"""SimReg cost against one attention core: `python -m megatron_simreg.bench.simreg`.

For each (batch, sequence, hidden) shape it times forward+backward of full and chunk-wise SimReg
and of one causal `scaled_dot_product_attention` (32 heads) at the same shape, and measures the
peak memory each adds on top of its inputs, then prints both as ratios to attention.

Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the peak resident-set growth of a
fresh subprocess that runs the operation once (see `megatron_simreg.bench.memory`).
"""

import argparse
import multiprocessing
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_simreg.bench.memory import peak_bytes, reset_peak, restart_with_fixed_mmap_threshold
from megatron_simreg.simreg import simreg_loss

DEFAULT_SHAPES = ((1, 2048, 1024), (1, 2048, 4096), (1, 4096, 4096))
HEADS = 32


def make_inputs(kind, shape, dtype, device, block_size, seed=0):
    """The operation's inputs and a closure running its forward and backward once."""
    b, s, h = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "attention":
        q, k, v = (
            torch.randn(b, HEADS, s, h // HEADS, generator=gen, device=device, dtype=dtype).requires_grad_()
            for _ in range(3)
        )
        grad_out = torch.randn(b, HEADS, s, h // HEADS, generator=gen, device=device, dtype=dtype)

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad_out)

        return (q, k, v, grad_out), step
    hidden = torch.randn(s, b, h, generator=gen, device=device, dtype=dtype).requires_grad_()  # Megatron's layout
    labels = torch.randint(0, 32000, (b, s), generator=gen, device=device)
    chunk = None if kind == "full" else int(kind.split("-")[1])

    def step():
        simreg_loss(hidden, labels, chunk_size=chunk, sequence_first=True, block_size=block_size).loss.backward()

    return (hidden, labels), step


def time_step(kind, shape, dtype, device, block_size, repeats):
    _, step = make_inputs(kind, shape, dtype, device, block_size)
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_bytes(kind, shape, dtype, device, block_size):
    if device == "cuda":
        inputs, step = make_inputs(kind, shape, dtype, device, block_size)
        step()  # allocates the input gradients, which are not extra memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_peak_in_fresh_process, (kind, shape, dtype, block_size))


def _cpu_peak_in_fresh_process(kind, shape, dtype, block_size):
    torch.set_num_threads(1)  # no thread pools growing during the measured run
    _, step = make_inputs(kind, shape, dtype, "cpu", block_size)
    step()  # faults in library code and allocates the input gradients: neither is extra memory
    base = reset_peak()
    step()
    return peak_bytes() - base


def main(argv=None):
    restart_with_fixed_mmap_threshold("megatron_simreg.bench.simreg")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in DEFAULT_SHAPES], help="b,s,h")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--block", type=int, default=512, help="SimReg tile size (block_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# SimReg (block {args.block}) vs one causal attention core ({HEADS} heads), fwd+bwd, {dtype}, {device_name}")
    print("| b, s, h | variant | time (ms) | time / attention | peak extra (MiB) | memory / attention |")
    print("|---|---|---|---|---|---|")
    kinds = ["attention", "full", f"chunk-{args.chunk}"]
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(","))
        results = {
            kind: (
                time_step(kind, shape, dtype, args.device, args.block, args.repeats),
                peak_extra_bytes(kind, shape, dtype, args.device, args.block),
            )
            for kind in kinds
        }
        attention_time, attention_bytes = results["attention"]
        for kind, (seconds, extra) in results.items():
            print(
                f"| {text} | {kind} | {seconds * 1e3:.1f} | {seconds / attention_time:.2f}x "
                f"| {extra / 2**20:.1f} | {extra / max(attention_bytes, 1):.2f}x |"
            )


if __name__ == "__main__":
    main()
