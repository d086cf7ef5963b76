"""Training-step cost of SimReg: `python -m megatron_simreg.bench.step [--config ...]`.

Times full training steps (forward, backward, AdaGC, optimizer) of the same model and batch with SimReg
off, full and chunk-wise, and measures each step's peak memory growth, then prints both as ratios to the
run without SimReg. On CPU by default with the tiny LLaMA; pass a config and `--set` to try others.
"""

import argparse
import statistics
import time

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_simreg import parallel
from megatron_simreg.bench.memory import peak_bytes, reset_peak, restart_with_fixed_mmap_threshold
from megatron_simreg.config import load_config
from megatron_simreg.local_loop import build_model_and_optimizer, schedule_of
from megatron_simreg.objective import SimRegObjective, forward_step



def measure(config: str, overrides: list[str], steps: int) -> tuple[float, int]:
    cfg = load_config(config, overrides)
    parallel.initialize(cfg)
    try:
        model, optimizer = build_model_and_optimizer(cfg)
        schedule = schedule_of(cfg, parallel_state.get_data_parallel_world_size())
        mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (mbs, seq + 1), generator=gen)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
                 "position_ids": torch.arange(seq).expand(mbs, seq)}
        objective = SimRegObjective.from_config(cfg)

        def step():
            model.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(
                forward_step_func=lambda it, m: forward_step(objective, lambda i: next(i), it, m),
                data_iterator=iter([batch] * schedule.micro_batches), model=[model],
                num_microbatches=schedule.micro_batches, seq_length=seq, micro_batch_size=mbs, forward_only=False,
            )
            optimizer.step()

        step()  # warm-up: optimizer state, library code
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        base = reset_peak()
        step()
        return statistics.median(times), peak_bytes() - base
    finally:
        parallel.destroy()


def main(argv=None):
    restart_with_fixed_mmap_threshold("megatron_simreg.bench.step")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-llama.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunk", type=int, help="chunk size of the chunk-wise variant (default: a quarter of the sequence)")
    args = parser.parse_args(argv)
    chunk = args.chunk or load_config(args.config, args.overrides).model.seq_length // 4
    variants = {
        "no SimReg": ["simreg.enabled=false"],
        "full SimReg": ["simreg.mode=full"],
        f"chunk-wise SimReg ({chunk})": ["simreg.mode=chunk", f"simreg.chunk_size={chunk}"],
    }
    results = {name: measure(args.config, args.overrides + extra, args.steps) for name, extra in variants.items()}
    base_time, base_memory = results["no SimReg"]
    cfg = load_config(args.config, args.overrides)
    print(f"# training step, {args.config} {' '.join(args.overrides)}: micro-batch {cfg.training.micro_batch_size} x "
          f"{cfg.model.seq_length} tokens, {cfg.training.global_batch_size // cfg.training.micro_batch_size} micro-batches, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {torch.get_num_threads()} threads'}")
    print("| variant | step time (ms) | time ratio | peak step memory growth (MiB) | memory ratio |")
    print("|---|---|---|---|---|")
    for name, (seconds, memory) in results.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base_time:.3f}x | {memory / 2**20:.1f} | {memory / max(base_memory, 1):.3f}x |")


if __name__ == "__main__":
    main()
