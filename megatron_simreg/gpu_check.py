"""One-shot validation on a GPU: `scripts/gpu_check.sh` (or `python -m megatron_simreg.gpu_check`).

Made for a single lent GPU and about ten minutes, with no network: every check runs in turn, each with its own
time limit, and a failing check is recorded rather than stopping the rest. The report (Markdown, the device
named) goes to `--output` (docs/gpu-validation.md by default):

1. SimReg against its float64 evaluation on the GPU: fp32 and bf16 inputs, TF32 allowed and not, each kernel.
2. SimReg's time and `max_memory_allocated` against one causal `scaled_dot_product_attention` (the benchmark).
3. megatron.training on the tiny LLaMA, bf16 with the distributed optimizer: 40 iterations straight, and 20 +
   exit + resume to 40 (iterations 21-40 compared, AdaGC state inside the checkpoint); its first 10 losses
   against the local loop's on this machine's CPU.
4. lambda = 0 against SimReg switched off (the same losses).
5. The tiny Mixtral, 10 iterations.
6. Export of megatron.training's torch_dist checkpoint to Hugging Face, logits against our model's.
7. The training step at the LLaMA2-350M shape with SimReg off, full and chunk-wise (time and memory).

Transformer Engine is not required: without it megatron.training runs megatron-core's local layers, and the
report says which ran. `--dry-run` runs none of the GPU work (on any machine): it checks that every piece the
checks need imports and that the data is there, and writes the report with every row marked "not run".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "training.precision=bf16", "parallel.distributed_optimizer=true", "training.micro_batch_size=4",
    "training.global_batch_size=8", "training.log_interval=1", "training.eval_interval=1000",
    "training.save_interval=1000",
    "schedule.warmup_steps=5", "adagc.warmup_steps=5", "logging.tensorboard=false",
]
TRAIN_LINE = re.compile(r"iteration +(\d+)/ +\d+ \|.*?\| lm loss: (\S+) \|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "gpu-validation.md"))
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "demo", "gutenberg_text_document"),
                        help="an indexed dataset prefix for the training checks (make demo writes this one)")
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "gpu_check"), help="run folders")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the pieces and write the report skeleton; no GPU work")
    args = parser.parse_args(argv)
    checks = [
        ("SimReg precision", lambda: simreg_precision()),
        ("SimReg cost", lambda: simreg_cost()),
        ("megatron.training: straight and resumed, against the CPU", lambda: training_and_resume(args)),
        ("lambda = 0", lambda: lambda_zero(args)),
        ("tiny Mixtral", lambda: mixtral(args)),
        ("export and logit parity", lambda: export_parity(args)),
        ("training step at the LLaMA2-350M shape", lambda: step_cost()),
    ]
    sections = [header(args)]
    if args.dry_run:
        problems = dry_run_problems(args)
        summary = "; ".join(problems) if problems else "every piece imports and the data is there"
        sections.append("Dry run: " + summary + ".")
        sections += [f"## {name}\n\nnot run (dry run)" for name, _ in checks]
        write(args.output, sections)
        print(f"gpu_check dry run: {len(checks)} checks ready" + (f"; problems: {problems}" if problems else ""))
        return 1 if problems else 0
    failed = 0
    for number, (name, check) in enumerate(checks, 1):
        start = time.perf_counter()
        print(f"[gpu_check {datetime.datetime.now():%H:%M:%S}] {number}/{len(checks)} {name} ...", flush=True)
        try:
            body = check()
        except Exception:  # record it and go on: one broken check must not cost the others' results
            failed += 1
            body = "FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```"
        sections.append(f"## {name}\n\n{body}\n\n({time.perf_counter() - start:.0f} s)")
        write(args.output, sections)  # after every check: a run cut short keeps what it measured
    print(f"gpu_check: {len(checks) - failed}/{len(checks)} checks ran; report in {args.output}")
    return 1 if failed else 0


def header(args) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        import transformer_engine  # noqa: F401

        layers = "Transformer Engine's layers"
    except ImportError:
        layers = "megatron-core's local layers (Transformer Engine is not installed here)"
    return (
        "# GPU validation\n\n"
        f"Written by `scripts/gpu_check.sh` on {datetime.date.today()}: {device}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, Python {platform.python_version()}; megatron.training ran {layers}.\n"
    )


def write(path: str, sections: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(sections).rstrip() + "\n")


def dry_run_problems(args) -> list[str]:
    problems = []
    for module in ("megatron.core", "megatron.training", "mistral_common", "transformers", "safetensors",
                   "megatron_simreg.bench.simreg", "megatron_simreg.bench.step", "megatron_simreg.export_hf"):
        try:
            __import__(module)
        except ImportError as error:
            problems.append(f"{module} does not import ({error})")
    if not os.path.isfile(args.data + ".bin"):
        problems.append(f"no dataset at {args.data}.bin (make demo writes it; pass --data)")
    return problems


# ---------------------------------------------------------------------------------------------
# 1-2. The SimReg kernel


def simreg_precision() -> str:
    """Loss and gradient errors against the float64 evaluation of the same inputs, per kernel, dtype and TF32."""
    import torch

    from megatron_simreg.simreg import simreg_loss

    rows = ["| kernel | input | TF32 | loss rel. error | gradient rel. error |", "|---|---|---|---|---|"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    s, h = 2048, 1024
    # Final-layer-like embeddings: a shared direction, one per label, and noise (negatives close together).
    labels = torch.randint(0, 200, (1, s), generator=gen, device="cuda")
    directions = torch.randn(201, h, generator=gen, device="cuda", dtype=torch.float64)
    hidden = directions[0] + 0.5 * directions[1 + labels] + 0.3 * torch.randn(1, s, h, generator=gen, device="cuda",
                                                                            dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        rounded = hidden.to(dtype).double()  # the errors measured are the kernel's, not the input rounding's
        reference = rounded.clone().requires_grad_()
        want = simreg_loss(reference, labels, kernel="torch").loss
        want.backward()
        for kernel in _kernels():
            for tf32 in (False, True):
                previous = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    x = hidden.to(dtype).requires_grad_()
                    got = simreg_loss(x, labels, kernel=kernel).loss
                    got.backward()
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = previous
                loss_error = abs(got.item() - want.item()) / abs(want.item())
                grad_error = ((x.grad.double() - reference.grad).norm() / reference.grad.norm()).item()
                rows.append(f"| {kernel} | {str(dtype).removeprefix('torch.')} | {'on' if tf32 else 'off'} "
                            f"| {loss_error:.2e} | {grad_error:.2e} |")
    return (
        f"(s, h) = ({s}, {h}), tau = 0.01, 200 labels, full SimReg, token reduction of one sequence.\n\n"
        + "\n".join(rows)
    )


def _kernels() -> list[str]:
    import importlib.util

    return ["torch", "triton"] if importlib.util.find_spec("triton") else ["torch"]


def simreg_cost() -> str:
    outputs = []
    for shapes in (["1,2048,1024", "1,2048,4096"], ["8,2048,4096"]):
        for kernel in _kernels():
            outputs.append(_run([sys.executable, "-m", "megatron_simreg.bench.simreg", "--device", "cuda",
                                 "--dtype", "bf16", "--kernel", kernel, "--repeats", "10", "--shapes", *shapes],
                                timeout=300))
    return "\n\n".join(outputs)


# ---------------------------------------------------------------------------------------------
# 3-6. megatron.training on the GPU


def training_and_resume(args) -> str:
    straight = _megatron(args, "straight", ["schedule.train_iters=40"])
    _megatron(args, "resumed", ["schedule.train_iters=40", "training.exit_interval=20"])
    resumed = _megatron(args, "resumed", ["schedule.train_iters=40"])
    cpu = _cpu_losses(args, "cpu", ["schedule.train_iters=10"])
    after = [abs(straight[i] - resumed[i]) for i in range(21, 41)]
    first = [abs(straight[i] - cpu[i]) for i in range(1, 11)]
    state = _adagc_state(os.path.join(args.work, "resumed", "checkpoints"), 40)
    return "\n".join([
        "| check | result |", "|---|---|",
        f"| iterations 21-40, straight against 20 + exit + resume: max abs. loss difference | {max(after):.3g} |",
        "| first 10 losses, GPU against the local loop on CPU (bf16 both): max abs. difference (goal 1e-2) "
        f"| {max(first):.3g} |",
        f"| AdaGC state inside the iteration-40 checkpoint | step {state['step']}, {len(state['gamma'])} thresholds |",
        f"| loss at 1, 20, 40 (straight) | {straight[1]:.4f}, {straight[20]:.4f}, {straight[40]:.4f} |",
    ])


def lambda_zero(args) -> str:
    zero = _megatron(args, "lambda0", ["schedule.train_iters=10", "simreg.weight=0"])
    off = _megatron(args, "simreg_off", ["schedule.train_iters=10", "simreg.enabled=false"])
    difference = max(abs(zero[i] - off[i]) for i in range(1, 11))
    return f"max abs. loss difference over 10 iterations, lambda = 0 against SimReg off: {difference:.3g} (0 expected)"


def mixtral(args) -> str:
    losses = _megatron(args, "mixtral", ["schedule.train_iters=10"], config="configs/tiny-mixtral.yaml")
    return f"10 iterations; loss {losses[1]:.4f} -> {losses[10]:.4f}"


def export_parity(args) -> str:
    """The straight run's torch_dist checkpoint exported on this node; HF logits (CPU) against ours (GPU), fp32."""
    import torch
    import transformers

    from megatron_simreg.config import load_config
    from megatron_simreg.export_hf import export, load_merged_state

    run = os.path.join(args.work, "straight")
    folder = export(os.path.join(run, "checkpoints"), os.path.join(run, "hf"))
    cfg = load_config(os.path.join(run, "config.yaml"))
    tokens = torch.randint(0, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    ours = _our_logits(cfg, load_merged_state(os.path.join(run, "checkpoints"), cfg), tokens)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = model(tokens).logits
    error = (ours[..., :theirs.shape[-1]] - theirs).abs().max().item()
    return (
        f"exported `{type(model).__name__}`; max abs. logit difference (fp32, 2 x 64 tokens): "
        f"{error:.3g} (goal 1e-3)"
    )


def _our_logits(cfg, state, tokens):
    import dataclasses

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_simreg.model import model_provider, transformer_config_from

    single = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, precision="fp32"))
    config = dataclasses.replace(transformer_config_from(single), transformer_impl="local")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        model = model_provider(single, config=config).cuda().eval()
        model.load_state_dict(state, strict=False)
        tokens = tokens.cuda()
        with torch.no_grad():
            return model(tokens, torch.arange(tokens.shape[1], device="cuda").expand_as(tokens), None).float().cpu()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _megatron(args, name: str, overrides: list[str], config: str = "configs/tiny-llama.yaml") -> dict[int, float]:
    """megatron.training on one GPU through the training entry; its logged loss per iteration."""
    settings = TINY + [f"data.prefix={args.data}", f"logging.run_dir={os.path.join(args.work, name)}", *overrides]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "megatron_simreg.train", "--config", config]
    out = _run(command + [part for setting in settings for part in ("--set", setting)], timeout=300)
    return {int(i): float(loss) for i, loss in TRAIN_LINE.findall(out)}


def _cpu_losses(args, name: str, overrides: list[str]) -> dict[int, float]:
    """The local loop on this machine's CPU (CUDA hidden), for the same config."""
    run_dir = os.path.join(args.work, name)
    settings = TINY + [f"data.prefix={args.data}", f"logging.run_dir={run_dir}", *overrides]
    _run([sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
          *(part for setting in settings for part in ("--set", setting))],
         timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if record["split"] == "train":
                losses[record["iteration"]] = record["lm loss"]
    # megatron.training logs the first iteration of a launch without starting an interval: its line at the
    # second iteration is the mean of the first two
    losses[2] = (losses[1] + losses[2]) / 2
    return losses


def _adagc_state(checkpoints: str, iteration: int) -> dict:
    import torch

    common = torch.load(os.path.join(checkpoints, f"iter_{iteration:07d}", "common.pt"), weights_only=False)
    return common["optimizer"]["adagc"]


# ---------------------------------------------------------------------------------------------
# 7. The training step at a paper shape


def step_cost() -> str:
    return _run([sys.executable, "-m", "megatron_simreg.bench.step", "--config", "configs/llama2-350m.yaml",
                 "--set", "training.micro_batch_size=4", "--set", "training.global_batch_size=4",
                 "--set", "parallel.distributed_optimizer=false", "--steps", "10", "--chunk", "1024"], timeout=400)


def _run(command: list[str], timeout: int, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:7])} ... exited {done.returncode}:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
