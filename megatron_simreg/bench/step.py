"""Training-step cost of SimReg: `python -m megatron_simreg.bench.step [--config ...] [--baselines]`.

Times full training steps (forward, backward, AdaGC, optimizer) of the same model and batch with SimReg
off, full and chunk-wise (and with `--baselines` each Table 1 baseline at its defaults and its cheap
options), and measures each step's peak memory growth, then prints both as ratios to the run without SimReg.
With the tiny LLaMA by default; pass a config and `--set` to try others. On a GPU the batch, the model and the
memory figures (`torch.cuda.max_memory_allocated`) are the GPU's.

The variants' steps are timed interleaved (one step of each in turn), so a machine that speeds up or
slows down during the run weighs on all of them alike; the per-round ratios' quartiles show the spread.
Times come from this process with the normal allocator; on CPU, memory from a second process whose allocator
returns freed tensors (see `bench.memory`), which would slow the timed steps down.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_simreg import parallel
from megatron_simreg.bench.memory import MMAP_ENV, peak_bytes, reset_peak
from megatron_simreg.config import load_config
from megatron_simreg.cpu_compat import cpu_compat
from megatron_simreg.local_loop import build_model_and_optimizer
from megatron_simreg.objective import SimRegObjective, forward_step
from megatron_simreg.run_plan import plan_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # megatron-core builds the model there


def training_step(cfg):
    """One full training step of a freshly built model on a fixed random batch, as a callable."""
    model, optimizer = build_model_and_optimizer(cfg)
    plan = plan_run(cfg, torch.distributed.get_world_size())
    mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
             "position_ids": torch.arange(seq).expand(mbs, seq)}
    batch = {key: value.to(DEVICE) for key, value in batch.items()}  # where the model is
    objective = SimRegObjective.from_config(cfg)

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=lambda it, m: forward_step(objective, lambda i: next(i), it, m),
            data_iterator=iter([batch] * plan.micro_batches), model=[model],
            num_microbatches=plan.micro_batches, seq_length=seq, micro_batch_size=mbs, forward_only=False,
        )
        optimizer.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # the step's time is its kernels' time, not the time to queue them

    return step


def measure(config: str, overrides: list[str], variants: dict[str, list[str]], steps: int, memory: bool,
            clock=time.perf_counter) -> dict:
    """Each variant's step seconds, one per round of interleaved steps, or with `memory` each step's peak RSS
    growth in bytes."""
    with cpu_compat():
        return _measure(config, overrides, variants, steps, memory, clock)


def _measure(config: str, overrides: list[str], variants: dict[str, list[str]], steps: int, memory: bool,
             clock) -> dict:
    parallel.initialize(load_config(config, overrides))  # the variants differ in SimReg only, not in layout
    try:
        runs = {name: training_step(load_config(config, overrides + extra)) for name, extra in variants.items()}
        for step in runs.values():
            step()  # warm-up: optimizer state, library code
        if memory:
            growth = {}
            for name, step in runs.items():
                base = reset_peak(DEVICE)
                step()
                growth[name] = peak_bytes(DEVICE) - base
            return growth
        times = {name: [] for name in runs}
        for _ in range(steps):
            for name, step in runs.items():
                start = clock()
                step()
                times[name].append(clock() - start)
        return times
    finally:
        parallel.destroy()


BASELINES = {  # each at its defaults, then its cheap option
    "SimCSE (views: forward)": ["regularizer.name=simcse"],
    "SimCSE (views: dropout)": ["regularizer.name=simcse", "regularizer.views=dropout"],
    "CPretrain": ["regularizer.name=cpretrain"],
    "CReg": ["regularizer.name=creg"],
    "SCE (target: ema)": ["regularizer.name=sce"],
    "SCE (target: view)": ["regularizer.name=sce", "regularizer.target=view"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-llama.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunk", type=int,
                        help="chunk size of the chunk-wise variant (default: a quarter of the sequence)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: this thread's CPU time, with one torch thread (OMP_NUM_THREADS=1) on a CPU; "
                             "other jobs on a shared machine do not inflate it as they do wall time")
    parser.add_argument("--baselines", action="store_true", help="also time the baselines (docs/baselines.md)")
    parser.add_argument("--memory-json", action="store_true", help=argparse.SUPPRESS)  # the memory process
    args = parser.parse_args(argv)
    if args.clock == "thread" and (torch.cuda.is_available() or torch.get_num_threads() != 1):
        parser.error("--clock thread measures one CPU thread: run with OMP_NUM_THREADS=1 on a CPU")
    cfg = load_config(args.config, args.overrides)
    chunk = args.chunk or cfg.model.seq_length // 4
    variants = {
        "no SimReg": ["simreg.enabled=false"],
        "full SimReg": ["simreg.mode=full"],
        f"chunk-wise SimReg ({chunk})": ["simreg.mode=chunk", f"simreg.chunk_size={chunk}"],
    }
    if args.baselines:
        variants.update(BASELINES)
    if args.memory_json:
        print(json.dumps(measure(args.config, args.overrides, variants, args.steps, memory=True)))
        return
    if DEVICE == "cuda":  # the allocator's statistics, in this process
        memory = measure(args.config, args.overrides, variants, args.steps, memory=True)
    else:  # resident-set growth, in a process whose allocator returns freed tensors (see bench.memory)
        given = argv if argv is not None else sys.argv[1:]
        memory = json.loads(subprocess.run(
            [sys.executable, "-m", "megatron_simreg.bench.step", "--memory-json", *given],
            env={**os.environ, MMAP_ENV: "65536"}, check=True, capture_output=True, text=True,
        ).stdout.splitlines()[-1])
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    rounds = measure(args.config, args.overrides, variants, args.steps, memory=False, clock=clock)
    seconds = {name: statistics.median(times) for name, times in rounds.items()}
    base_time, base_memory = seconds["no SimReg"], memory["no SimReg"]
    micro_batches = cfg.training.global_batch_size // cfg.training.micro_batch_size
    machine = (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available()
               else f"CPU, {torch.get_num_threads()} threads")
    print(f"# training step, {args.config} {' '.join(args.overrides)}: micro-batch {cfg.training.micro_batch_size} x "
          f"{cfg.model.seq_length} tokens, {micro_batches} micro-batches, {machine}, "
          f"median of {args.steps} interleaved steps, {args.clock} time")
    print("| variant | step time (ms) | time ratio | paired ratio, median [quartiles] | peak step memory growth (MiB) "
          "| memory ratio |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        low, middle, high = paired_ratio_quartiles(rounds[name], rounds["no SimReg"])
        print(f"| {name} | {seconds[name] * 1e3:.1f} | {seconds[name] / base_time:.3f}x | "
              f"{middle:.3f}x [{low:.3f}, {high:.3f}] | {memory[name] / 2**20:.1f} | "
              f"{memory[name] / max(base_memory, 1):.3f}x |")


def paired_ratio_quartiles(times: list[float], base_times: list[float]) -> tuple[float, float, float]:
    """Quartiles of the per-round ratios: each round times every variant back to back, so a machine's drift
    between rounds cancels out of its ratio; their spread says how far one median ratio can be trusted."""
    ratios = [t / b for t, b in zip(times, base_times)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, middle, high = statistics.quantiles(ratios, n=4)
    return low, middle, high


if __name__ == "__main__":
    main()
