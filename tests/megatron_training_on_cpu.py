"""Run `megatron_simreg.megatron_entry.pretrain` (Megatron-LM's own loop) on a CPU, for the tests.

megatron.training insists on CUDA: it asserts a GPU, moves batches with `.cuda()`, creates its
bookkeeping tensors (loss sums, iteration flags, rerun checks) with `device="cuda"`, and synchronises
and measures memory through `torch.cuda`. On top of the package's CPU-compatibility layer this script
points exactly those at the CPU, in this process only, so the tests can run our GPU entry point through
Megatron's real loop: argument parsing, initialisation, our model provider, forward step, loss
function and dataset provider, its optimizer and scheduler, AdaGC's hooks, validation, torch_dist
checkpoints and resume. Nothing here is part of the package.

    python tests/megatron_training_on_cpu.py configs/tiny-llama.yaml training.exit_interval=4 ...

(with torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment).
"""

import importlib
import sys
import types

import torch

from megatron_simreg.cpu_compat import CudaStreamsOnCpu, cpu_compat

# The megatron.training modules (and the core ones only it reaches) that touch CUDA directly.
_MODULES = (
    "megatron.training.training", "megatron.training.initialize", "megatron.training.checkpointing",
    "megatron.training.arguments",
    "megatron.training.utils.common_utils", "megatron.training.utils.utils", "megatron.core.timers",
    "megatron.core.rerun_state_machine", "megatron.core.transformer.moe.moe_logging",
)


class _OneCpuDevice(CudaStreamsOnCpu):
    """`torch.cuda` as those modules see it: one device (the CPU), no memory to report."""

    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    current_device = staticmethod(lambda: 0)
    set_device = staticmethod(lambda device: None)
    empty_cache = staticmethod(lambda: None)
    memory_allocated = max_memory_allocated = memory_reserved = max_memory_reserved = staticmethod(lambda *a: 0)
    memory_stats = staticmethod(lambda *a: {})
    get_device_properties = staticmethod(lambda *a: types.SimpleNamespace(major=9, minor=0, name="CPU"))  # Hopper-like


class _TorchOnCpu:
    """`torch` as those modules see it: any `device="cuda"` argument means the CPU."""

    def __getattr__(self, name):
        if name == "cuda":
            return _OneCpuDevice()
        attribute = getattr(torch, name)
        if not callable(attribute) or isinstance(attribute, type):
            return attribute

        def on_cpu(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            return attribute(*args, **kwargs)

        return on_cpu


def megatron_training_on_cpu() -> None:
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
    torch.nn.Module.cuda = lambda module, *args, **kwargs: module
    torch.cuda.synchronize = lambda *args: None
    for name in _MODULES:
        importlib.import_module(name).torch = _TorchOnCpu()

    # Megatron warms its fused GPU kernels up on random inputs drawn from the CUDA generator; on a CPU that
    # means nothing and would draw from the CPU generator our CPU-initialised weights come from.
    importlib.import_module("megatron.training.initialize")._warmup_jit_function = lambda *args, **kwargs: None


if __name__ == "__main__":  # checkpoint saving starts helper processes that import this file again
    from megatron_simreg.config import load_config
    from megatron_simreg.megatron_entry import pretrain

    cfg = load_config(sys.argv[1], sys.argv[2:])
    # No NCCL without GPUs; weights drawn on the CPU as the local loop draws them, so both loops start alike.
    cfg.megatron.extra_args += ["--distributed-backend", "gloo", "--use-cpu-initialization"]
    with cpu_compat() as active:
        assert active, "this script is for machines without CUDA"
        megatron_training_on_cpu()
        pretrain(cfg)
