"""One-shot validation on a GPU: `scripts/gpu_check.sh` (or `python -m megatron_simreg.gpu_check`).

Made for a single lent GPU (H100 or H200, torch and triton there, no network) and at most 9 minutes of wall
time in all: the checks run in the order of what they prove (the kernel's numbers, then training, then speed),
each under its own limit and under one overall deadline, and a failing or timed-out check is recorded rather
than stopping the rest. A launch that runs out of time is killed with all its descendants (torchrun's workers,
which hold the GPU, run in sessions of their own). Each run gets a fresh work folder, so a second run never
resumes from the first one's checkpoints. The report (Markdown, the device named) is rewritten after every
check and goes to `--output` (docs/gpu-validation.md by default):

1. SimReg against its float64 evaluation on the GPU: fp32 and bf16 inputs, TF32 allowed and not, each kernel.
2. No host-device synchronisation in one SimReg forward and backward (sync debug mode "error").
3. megatron.training on the tiny LLaMA with base.yaml's production flags that need no Transformer Engine (bf16,
   distributed optimizer, overlapped gradient reduce and parameter gather, fused cross-entropy): 20 iterations
   straight, and 10 + exit + resume to 20 (iterations 11-20 compared, AdaGC state inside the checkpoint).
4. megatron.training on the GPU against the local loop on this machine's CPU: both draw their weights on the
   CPU from one seed with megatron-core's local layers, so their first 10 losses are comparable.
5. lambda = 0 against SimReg switched off (the same losses).
6. The tiny Mixtral, 10 iterations.
7. Export of megatron.training's torch_dist checkpoint to Hugging Face, logits against our model's.
8. SimReg's time and `max_memory_allocated` against one causal `scaled_dot_product_attention` (the benchmark).
9. A training step of a 2-layer model at the 7B layer shape (h = 4096, s = 2048) with SimReg off, full and
   chunk-wise; then the same at the LLaMA2-350M shape (time and `max_memory_allocated`).

Transformer Engine is not required: without it megatron.training runs megatron-core's local layers, and the
report says which ran. `--dry-run` runs none of the GPU work (on any machine): it lists every package the checks
need besides torch, triton and their dependencies, with the version found, imports every module the checks
import, checks the data, and writes the report with every row marked "not run". `--wheels` prints the command
that downloads those packages' wheels into `.whl/`, which `scripts/gpu_check.sh` installs on the GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 9 * 60
TINY = [
    "training.precision=bf16", "parallel.distributed_optimizer=true", "training.micro_batch_size=4",
    "training.global_batch_size=8", "training.log_interval=1", "training.eval_interval=1000",
    "training.save_interval=1000",
    "schedule.warmup_steps=5", "adagc.warmup_steps=5", "logging.tensorboard=false",
]
# base.yaml's megatron.training flags that need no Transformer Engine (its `--attention-backend fused` does)
PRODUCTION_FLAGS = ["--overlap-grad-reduce", "--overlap-param-gather", "--cross-entropy-loss-fusion", "--manual-gc"]
# The packages the checks import (their dependencies come along in `needed_distributions`); torch and triton,
# which the GPU machine's image has, and whatever they need, are not counted.
IMPORTED = ("megatron-core", "mistral_common", "sentencepiece", "transformers", "safetensors", "PyYAML", "tqdm",
            "numpy", "psutil", "xxhash")
PROVIDED = ("torch", "triton")
# Every module a check imports, so that a dry run proves they all import here.
CHECK_MODULES = ("megatron.training", "megatron_simreg.train", "megatron_simreg.megatron_entry",
                 "megatron_simreg.export_hf", "megatron_simreg.bench.simreg", "megatron_simreg.bench.step",
                 "transformers.models.llama.modeling_llama", "transformers.models.mixtral.modeling_mixtral", "psutil")
TRAIN_LINE = re.compile(r"iteration +(\d+)/ +\d+ \|.*?\| lm loss: (\S+) \|")


class Deadline:
    """The whole check's time: each launch gets at most what is left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class OutOfTime(Exception):
    pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "gpu-validation.md"))
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "demo", "gutenberg_text_document"),
                        help="an indexed dataset prefix for the training checks (make demo writes this one)")
    parser.add_argument("--work", default=os.path.join(
                        ROOT, "runs", "gpu_check", f"{datetime.datetime.now():%Y%m%d-%H%M%S}"),
                        help="a new folder for the run folders (default: one per run under runs/gpu_check/)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for every check together")
    parser.add_argument("--dry-run", action="store_true",
                        help="list and verify the packages, check the data, write the report skeleton; no GPU work")
    parser.add_argument("--wheels", action="store_true",
                        help="print the pip command that downloads the needed packages' wheels into .whl/")
    args = parser.parse_args(argv)
    if args.wheels:
        print(wheel_download_command())
        return 0
    if os.path.exists(args.work) and os.listdir(args.work):
        parser.error(f"--work {args.work} is not empty: a check resumes nothing, pass a new folder")
    checks = [
        ("SimReg precision", lambda deadline: simreg_precision()),
        ("SimReg host synchronisations", lambda deadline: simreg_host_syncs()),
        ("megatron.training with the production flags: straight and resumed",
         lambda deadline: training_and_resume(args, deadline)),
        ("megatron.training on the GPU against the local loop on the CPU",
         lambda deadline: gpu_against_cpu(args, deadline)),
        ("lambda = 0", lambda deadline: lambda_zero(args, deadline)),
        ("tiny Mixtral", lambda deadline: mixtral(args, deadline)),
        ("export and logit parity", lambda deadline: export_parity(args)),
        ("SimReg cost", lambda deadline: simreg_cost(deadline)),
        ("training step at the 7B layer shape and at the LLaMA2-350M shape", lambda deadline: step_cost(deadline)),
        ("the Table 1 baselines in bf16 with the production flags", lambda deadline: baselines(args, deadline)),
    ]
    sections = [header(args)]
    if args.dry_run:
        needed = needed_distributions()
        found, problems = packages(needed), dry_run_problems(args, needed)
        sections.append(found)
        summary = "; ".join(problems) if problems else "every piece imports and the data is there"
        sections.append(f"Dry run: {summary}.")
        sections += [f"## {name}\n\nnot run (dry run)" for name, _ in checks]
        write(args.output, sections)
        print(found)
        print(f"gpu_check dry run: {len(checks)} checks ready" + (f"; problems: {problems}" if problems else ""))
        return 1 if problems else 0
    sections.append(packages(needed_distributions()))
    failed = run_checks(checks, Deadline(args.deadline), sections, args.output)
    print(f"gpu_check: {len(checks) - failed}/{len(checks)} checks passed; report in {args.output}")
    return 1 if failed else 0


def run_checks(checks, deadline: Deadline, sections: list[str], output: str) -> int:
    """Each check in turn, its section written as soon as it ends; the number that failed or did not run."""
    failed = 0
    for number, (name, check) in enumerate(checks, 1):
        start = time.perf_counter()
        if deadline.left() <= 0:
            failed += 1
            sections.append(f"## {name}\n\nnot run: the overall deadline had passed")
            write(output, sections)
            continue
        print(f"[gpu_check {datetime.datetime.now():%H:%M:%S}] {number}/{len(checks)} {name} ...", flush=True)
        try:
            body = check(deadline)
        except Exception:  # record it and go on: one broken check must not cost the others' results
            failed += 1
            body = "FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```"
        sections.append(f"## {name}\n\n{body}\n\n({time.perf_counter() - start:.0f} s)")
        write(output, sections)  # after every check: a run cut short keeps what it measured
    return failed


def header(args) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        import transformer_engine  # noqa: F401

        layers = "Transformer Engine's layers"
    except ImportError:
        layers = "megatron-core's local layers (Transformer Engine is not installed here)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return (
        "# GPU validation\n\n"
        f"Written by `scripts/gpu_check.sh` on {datetime.date.today()} at commit {commit.stdout.strip() or 'unknown'}: "
        f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}; "
        f"megatron.training ran {layers}.\n"
    )


def needed_distributions() -> dict[str, str]:
    """Every distribution the checks need besides torch, triton and their own dependencies, with the version
    installed here ("missing" where it is not): IMPORTED and what they require, transitively."""
    provided = requirement_closure(PROVIDED)
    return {name: version for name, version in requirement_closure(IMPORTED).items() if name not in provided}


def requirement_closure(roots) -> dict[str, str]:
    """Canonical name -> version of `roots` and their requirements (extras left out, markers evaluated here)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
            continue
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def packages(needed: dict[str, str]) -> str:
    listed = ", ".join(f"{name} {version}" for name, version in sorted(needed.items()))
    return f"Packages besides torch, triton and their dependencies: {listed}."


def wheel_download_command() -> str:
    """`pip download` of the needed packages at this environment's versions, for the GPU machine's Python 3.12."""
    platforms = " ".join(f"--platform {p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                      "manylinux_2_17_x86_64", "manylinux2014_x86_64"))
    pins = " ".join(f"{name}=={version}" for name, version in sorted(needed_distributions().items()))
    return (f"python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
            f"{platforms} -d .whl {pins}")


def write(path: str, sections: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(sections).rstrip() + "\n")


def dry_run_problems(args, needed: dict[str, str]) -> list[str]:
    problems = [f"{name} is not installed" for name, version in needed.items() if version == "missing"]
    for module in CHECK_MODULES:
        try:
            __import__(module)
        except ImportError as error:
            problems.append(f"{module} does not import ({error})")
    try:  # the training checks' tokenizer: built at run time, so its imports come only now
        from megatron_simreg.data import build_tokenizer
        from megatron_simreg.data.tokenizer import default_tokenizer_path

        build_tokenizer(default_tokenizer_path()).tokenize("a check")
    except (ImportError, FileNotFoundError) as error:
        problems.append(f"the training checks' tokenizer cannot be built ({error})")
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
    hidden, labels = _final_layer_like(2048, 1024, torch.float64)
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
        "(s, h) = (2048, 1024), tau = 0.01, 200 labels, full SimReg, token reduction of one sequence.\n\n"
        + "\n".join(rows)
    )


def _final_layer_like(s: int, h: int, dtype):
    """Final-layer-like embeddings on the GPU: a shared direction, one per label, and noise (negatives close)."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, 200, (1, s), generator=gen, device="cuda")
    directions = torch.randn(201, h, generator=gen, device="cuda", dtype=dtype)
    noise = torch.randn(1, s, h, generator=gen, device="cuda", dtype=dtype)
    return directions[0] + 0.5 * directions[1 + labels] + 0.3 * noise, labels


def simreg_host_syncs() -> str:
    """One bf16 SimReg forward and backward (kernel auto) under torch's sync debug mode "error": a synchronising
    CUDA call (which stalls the host until the GPU's queue drains) raises, naming its line, and fails the check."""
    import torch

    from megatron_simreg.simreg import simreg_loss

    hidden, labels = _final_layer_like(2048, 1024, torch.float32)
    x = hidden.to(torch.bfloat16).requires_grad_()
    simreg_loss(x, labels).loss.backward()  # warm-up: compilation and caches are not the steady state
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        simreg_loss(x, labels).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no synchronising call in one forward and backward (kernel auto, bf16, (1, 2048, 1024))"


def _kernels() -> list[str]:
    import importlib.util

    return ["torch", "triton"] if importlib.util.find_spec("triton") else ["torch"]


# ---------------------------------------------------------------------------------------------
# 3-7. megatron.training on the GPU


def training_and_resume(args, deadline: Deadline) -> str:
    production = [f"megatron.extra_args=[{','.join(PRODUCTION_FLAGS)}]"]
    straight = _megatron(args, deadline, "straight", ["schedule.train_iters=20", *production])
    _megatron(args, deadline, "resumed", ["schedule.train_iters=20", "training.exit_interval=10", *production])
    resumed = _megatron(args, deadline, "resumed", ["schedule.train_iters=20", *production])
    after = [abs(straight[i] - resumed[i]) for i in range(11, 21)]
    state = _adagc_state(os.path.join(args.work, "resumed", "checkpoints"), 20)
    return "\n".join([
        f"Flags: {' '.join(PRODUCTION_FLAGS)}, bf16, distributed optimizer.\n",
        "| check | result |", "|---|---|",
        f"| iterations 11-20, straight against 10 + exit + resume: max abs. loss difference | {max(after):.3g} |",
        f"| AdaGC state inside the iteration-20 checkpoint | step {state['step']}, {len(state['gamma'])} thresholds |",
        f"| loss at 1, 10, 20 (straight) | {straight[1]:.4f}, {straight[10]:.4f}, {straight[20]:.4f} |",
    ])


def gpu_against_cpu(args, deadline: Deadline) -> str:
    """Weights drawn on the CPU from the same seed into megatron-core's local layers in both loops (TE's layers
    would hold other tensors), so the first losses differ only by GPU against CPU bf16 arithmetic."""
    from megatron_simreg.megatron_entry import LOCAL_LAYER_ARGS

    same_weights = f"megatron.extra_args=[{','.join(['--use-cpu-initialization', *LOCAL_LAYER_ARGS])}]"
    gpu = _megatron(args, deadline, "gpu_local_layers", ["schedule.train_iters=10", same_weights])
    cpu = _cpu_losses(args, deadline, "cpu", ["schedule.train_iters=10"])
    first = [abs(gpu[i] - cpu[i]) for i in range(1, 11)]
    return ("first 10 losses, GPU against the local loop on CPU (bf16 both, the same initial weights): "
            f"max abs. difference {max(first):.3g} (goal 1e-2); loss 1: GPU {gpu[1]:.4f}, CPU {cpu[1]:.4f}")


def lambda_zero(args, deadline: Deadline) -> str:
    zero = _megatron(args, deadline, "lambda0", ["schedule.train_iters=10", "simreg.weight=0"])
    off = _megatron(args, deadline, "simreg_off", ["schedule.train_iters=10", "simreg.enabled=false"])
    difference = max(abs(zero[i] - off[i]) for i in range(1, 11))
    return f"max abs. loss difference over 10 iterations, lambda = 0 against SimReg off: {difference:.3g} (0 expected)"


def mixtral(args, deadline: Deadline) -> str:
    losses = _megatron(args, deadline, "mixtral", ["schedule.train_iters=10"], config="configs/tiny-mixtral.yaml")
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


def baselines(args, deadline: Deadline) -> str:
    """Each baseline at its faithful defaults (SimCSE's second forward, SCE's fp32 momentum encoder run in bf16,
    CPretrain's label pairs, CReg's vocabulary-sized views) through megatron.training: the CPU tests train them in
    fp32 and without Transformer Engine, whose fused attention (base.yaml's backend) takes only bf16/fp16."""
    from megatron_simreg import regularizers
    from megatron_simreg.model import have_transformer_engine

    flags = PRODUCTION_FLAGS + (["--attention-backend", "fused"] if have_transformer_engine() else [])
    production = f"megatron.extra_args=[{','.join(flags)}]"
    rows = [f"Flags: {' '.join(flags)}, bf16, distributed optimizer.\n", "| baseline | loss at 1 -> 10 |", "|---|---|"]
    for name in (name for name in regularizers.REGISTRY if name != "simreg"):
        losses = _megatron(args, deadline, name, ["schedule.train_iters=10", f"regularizer.name={name}", production])
        rows.append(f"| {name} | {losses[1]:.4f} -> {losses[10]:.4f} |")
    return "\n".join(rows)


def _megatron(args, deadline: Deadline, name: str, overrides: list[str],
              config: str = "configs/tiny-llama.yaml") -> dict[int, float]:
    """megatron.training on one GPU through the training entry; its logged loss per iteration."""
    settings = TINY + [f"data.prefix={args.data}", f"logging.run_dir={os.path.join(args.work, name)}", *overrides]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "megatron_simreg.train", "--config", config]
    out = _run(command + [part for setting in settings for part in ("--set", setting)], deadline, timeout=240)
    return {int(i): float(loss) for i, loss in TRAIN_LINE.findall(out)}


def _cpu_losses(args, deadline: Deadline, name: str, overrides: list[str]) -> dict[int, float]:
    """The local loop on this machine's CPU (CUDA hidden), for the same config."""
    run_dir = os.path.join(args.work, name)
    settings = TINY + [f"data.prefix={args.data}", f"logging.run_dir={run_dir}", *overrides]
    _run([sys.executable, "-m", "megatron_simreg.train", "--config", "configs/tiny-llama.yaml",
          *(part for setting in settings for part in ("--set", setting))],
         deadline, timeout=240, env={"CUDA_VISIBLE_DEVICES": ""})
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
# 8-9. Speed and memory


def simreg_cost(deadline: Deadline) -> str:
    outputs = []
    for shapes in (["1,2048,1024", "1,2048,4096"], ["8,2048,4096"]):
        for kernel in _kernels():
            outputs.append(_run([sys.executable, "-m", "megatron_simreg.bench.simreg", "--device", "cuda",
                                 "--dtype", "bf16", "--kernel", kernel, "--repeats", "10", "--shapes", *shapes],
                                deadline, timeout=120))
    return "\n\n".join(outputs)


def step_cost(deadline: Deadline) -> str:
    """Training steps with SimReg off, full and chunk-wise (bench.step): two layers of LLaMA2-7B's width at its
    sequence length, where SimReg's share of a layer's work shows, then the whole 350M model."""
    single = ["training.micro_batch_size=1", "training.global_batch_size=1", "parallel.distributed_optimizer=false"]
    seven_b_layers = ["--config", "configs/llama2-7b.yaml", "--set", "model.num_layers=2"]
    small = ["--config", "configs/llama2-350m.yaml", "--set", "training.micro_batch_size=4",
             "--set", "training.global_batch_size=4", "--set", "parallel.distributed_optimizer=false"]
    outputs = []
    for model in (seven_b_layers + [part for s in single for part in ("--set", s)], small):
        outputs.append(_run([sys.executable, "-m", "megatron_simreg.bench.step", *model, "--steps", "10",
                             "--chunk", "1024"], deadline, timeout=240))
    return "\n\n".join(outputs)


def _run(command: list[str], deadline: Deadline, timeout: float, env: dict | None = None) -> str:
    """Run `command` for at most `timeout` seconds and what the deadline leaves; its standard output. On expiry
    the process and all its descendants are killed: torchrun starts each worker in a session of its own, so
    killing torchrun (or its process group) would leave the worker holding the GPU."""
    limit = min(timeout, deadline.left())
    if limit <= 0:
        raise OutOfTime(f"no time left for {' '.join(command[:7])}")
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        stdout, stderr = process.communicate()
        raise OutOfTime(f"{' '.join(command[:7])} ... killed after {limit:.0f} s:\n{stdout[-1500:]}\n{stderr[-3000:]}")
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:7])} ... exited {process.returncode}:\n{stdout[-1500:]}\n{stderr[-3000:]}"
        )
    return stdout.strip()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, whichever session or process group each is in."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]  # before the kill: orphans are re-parented
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


if __name__ == "__main__":
    sys.exit(main())
