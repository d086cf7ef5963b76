"""SimReg cost against one attention core: `python -m megatron_simreg.bench.simreg`.

For each (batch, sequence, hidden) shape it times forward+backward of full and chunk-wise SimReg
and of one causal `scaled_dot_product_attention` (32 heads) at the same shape, and measures the
peak memory each adds on top of its inputs, then prints both as ratios to attention, and the goals
(issue 15) against them. `--kernel torch triton` times both pairwise kernels in the same run (Triton needs
CUDA tensors); the default is what `simreg_loss` picks (Triton on a GPU, PyTorch on a CPU).

Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the peak resident-set growth of a
fresh subprocess that runs the operation once, with glibc's fixed mmap threshold (see
`megatron_simreg.bench.memory`). Times come from this process, with the normal allocator: the fixed threshold
maps every large temporary afresh and would charge page faults to whatever allocates most.
"""

import argparse
import multiprocessing
import os
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_simreg.bench.memory import MMAP_ENV, peak_bytes, reset_peak
from megatron_simreg.simreg import simreg_loss

DEFAULT_SHAPES = ((1, 2048, 1024), (1, 2048, 4096), (1, 4096, 4096))
HEADS = 32
GOALS = {"cpu": {"full": 0.65, "chunk": 0.35}, "cuda": {"full": 0.5, "chunk": 0.15}}
"""Time of SimReg forward+backward over one causal attention core's, at most (issue 15)."""


EMBEDDINGS = ("random", "anisotropic")
"""random: Gaussian hidden states, near-orthogonal at h >= 1024, so at tau = 0.01 every anchor's Lsr is about
-90 and its gradient weight (softplus' slope) about 1e-40: the saturated regime. anisotropic: the same plus
three times one shared random direction (cosines ~0.9, Lsr ~ -2.5, every anchor live), as hidden states are
early in training."""


def make_inputs(kind, shape, dtype, device, block_size, seed=0, kernel="auto", embeddings="random"):
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
    hidden = torch.randn(s, b, h, generator=gen, device=device, dtype=dtype)  # Megatron's layout
    if embeddings == "anisotropic":
        hidden += 3 * torch.randn(h, generator=gen, device=device, dtype=dtype)
    hidden.requires_grad_()
    labels = torch.randint(0, 32000, (b, s), generator=gen, device=device)
    chunk = None if kind == "full" else int(kind.split("-")[1])

    def step():
        out = simreg_loss(hidden, labels, chunk_size=chunk, sequence_first=True, block_size=block_size, kernel=kernel)
        out.loss.backward()

    return (hidden, labels), step


def time_interleaved(variants, shape, dtype, device, block_size, repeats, clock=time.perf_counter, embeddings="random"):
    """Median seconds per variant; one run of each in turn, so a shared machine's drift weighs on all alike."""
    steps = {name: make_inputs(kind, shape, dtype, device, block_size, kernel=kernel, embeddings=embeddings)[1]
             for name, kind, kernel in variants}
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = clock()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(clock() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def peak_extra_bytes(kind, shape, dtype, device, block_size, kernel, embeddings="random"):
    if device == "cuda":
        inputs, step = make_inputs(kind, shape, dtype, device, block_size, kernel=kernel, embeddings=embeddings)
        step()  # allocates the input gradients, which are not extra memory
        base = reset_peak("cuda")
        step()
        return peak_bytes("cuda") - base
    os.environ[MMAP_ENV] = "65536"  # read by glibc when the subprocess starts
    try:
        pool = multiprocessing.get_context("spawn").Pool(1)
    finally:
        del os.environ[MMAP_ENV]
    with pool:
        return pool.apply(_cpu_peak_in_fresh_process, (kind, shape, dtype, block_size, kernel, embeddings))


def _cpu_peak_in_fresh_process(kind, shape, dtype, block_size, kernel, embeddings):
    torch.set_num_threads(1)  # no thread pools growing during the measured run
    _, step = make_inputs(kind, shape, dtype, "cpu", block_size, kernel=kernel, embeddings=embeddings)
    step()  # faults in library code and allocates the input gradients: neither is extra memory
    base = reset_peak()
    step()
    return peak_bytes() - base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in DEFAULT_SHAPES], help="b,s,h")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--block", type=int, default=512, help="SimReg tile size (block_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--kernel", nargs="+", choices=["auto", "torch", "triton"], default=["auto"])
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--embeddings", choices=EMBEDDINGS, default="random",
                        help="SimReg's hidden states: random (anchors saturated) or anisotropic (anchors live)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: this thread's CPU time (with --threads 1 on a CPU), which other jobs on a shared "
                             "machine do not inflate as they do wall time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.device != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# SimReg (block {args.block}) vs one causal attention core ({HEADS} heads), fwd+bwd, {dtype}, "
          f"{device_name}, median of {args.repeats} interleaved runs, {args.clock} time, {args.embeddings} embeddings")
    print("| b, s, h | variant | time (ms) | time / attention | peak extra (MiB) | memory / attention |")
    print("|---|---|---|---|---|---|")
    variants = [("attention", "attention", None)]
    for kernel in args.kernel:
        suffix = "" if len(args.kernel) == 1 else f" ({kernel})"
        variants += [(f"full{suffix}", "full", kernel), (f"chunk-{args.chunk}{suffix}", f"chunk-{args.chunk}", kernel)]
    goals = GOALS["cuda" if args.device == "cuda" else "cpu"]
    verdicts = []
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(","))
        seconds = time_interleaved(
            variants, shape, dtype, args.device, args.block, args.repeats, clock, embeddings=args.embeddings
        )
        results = {
            name: (seconds[name],
                   peak_extra_bytes(kind, shape, dtype, args.device, args.block, kernel, args.embeddings))
            for name, kind, kernel in variants
        }
        attention_time, attention_bytes = results["attention"]
        for name, (seconds, extra) in results.items():
            print(
                f"| {text} | {name} | {seconds * 1e3:.1f} | {seconds / attention_time:.2f}x "
                f"| {extra / 2**20:.1f} | {extra / max(attention_bytes, 1):.2f}x |"
            )
            goal = goals.get(name.split("-")[0].split(" ")[0])
            if goal is not None:
                ratio = seconds / attention_time
                verdict = "met" if ratio <= goal else "NOT met"
                verdicts.append(f"{text} {name}: {ratio:.2f}x attention, goal <= {goal}x: {verdict}")
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
