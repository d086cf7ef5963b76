"""Let megatron-core's GPT and MoE code run on CPU (tests, the demo), over gloo when multi-process.

megatron-core places tensors with `torch.cuda.current_device()`, builds the default causal mask on
"cuda", and keeps its model-parallel RNG states through `torch.cuda.get_rng_state`/`manual_seed`.
On a machine without CUDA, `cpu_compat()` points exactly those at the CPU:

- `torch.cuda.current_device()` returns the CPU device (RoPE frequencies, attention, linear-layer
  buffers, router and loss tensors take it as `device=`);
- `torch.cuda.get_rng_state`/`set_rng_state`/`manual_seed` act on the CPU generator, and
  megatron's `_get_cuda_rng_state`/`_set_cuda_rng_state` likewise, so `CudaRNGStatesTracker`
  forks (dropout regions, per-rank initialisation) keep working;
- `get_default_causal_mask`/`get_sliding_window_causal_mask` build their masks on the CPU;
- the modules that create small bookkeeping tensors with a literal `device="cuda"` (the pipeline
  schedules' token counts, the optimizers' scale and overflow flags, grad clipping's norm buffers, the
  DDP grad buffers) see a `torch` whose tensor factories put "cuda" tensors on the CPU, and whose
  `torch.cuda` streams and events are no-ops (CPU work is already ordered);
- megatron's mixed-precision and distributed optimizers (`Float16OptimizerWithFloat16Params`,
  `DistributedOptimizer`) sort parameters by `param.type()` strings such as "torch.cuda.FloatTensor"
  and refuse anything else: while their constructors run, CPU tensors report those CUDA names, so
  bf16 training and the distributed optimizer (reduce-scatter/all-gather over gloo) work on CPU;
- functions megatron-core compiles (`megatron.core.jit.jit_fuser` is torch.compile: the bias-dropout-add,
  SwiGLU) run eagerly (`torch.compiler.set_stance("force_eager")`): Inductor's CPU code for the
  bias-dropout-add gives NaN on its first call under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU (torch
  2.14.1), and the same Python functions run eagerly compute the same sums.

`with cpu_compat():` applies these remaps and undoes every one of them on exit (nested uses stack); nothing
changes where CUDA is available. Only the CPU training entry (the local loop), the importer's `torch_dist`
writer and the tests enter it: export, evaluation and anything else that runs beside them never see a patched
torch or megatron.
"""

import contextlib
import functools
import importlib
import logging

import torch

_CPU = torch.device("cpu")


@contextlib.contextmanager
def cpu_compat():
    """Remap megatron-core's CUDA calls to the CPU while inside; yields whether the remaps are active."""
    if torch.cuda.is_available():
        yield False
        return
    patches = _Patches()
    try:
        _apply(patches)
        with torch.compiler.set_stance("force_eager"):
            yield True
    finally:
        patches.undo()


class _Patches:
    """Attributes set on modules and classes, each recorded so it can be put back (last set, first undone)."""

    def __init__(self):
        self._saved = []

    def set(self, owner, name: str, value) -> None:
        """`owner.name = value`; a class's own attribute is recorded, not one it inherits."""
        before = owner.__dict__.get(name, _ABSENT) if isinstance(owner, type) else getattr(owner, name, _ABSENT)
        self._saved.append(lambda: delattr(owner, name) if before is _ABSENT else setattr(owner, name, before))
        setattr(owner, name, value)

    def set_level(self, logger: logging.Logger, level: int) -> None:
        before = logger.level
        self._saved.append(lambda: logger.setLevel(before))
        logger.setLevel(level)

    def undo(self) -> None:
        while self._saved:
            self._saved.pop()()


_ABSENT = object()


def _apply(patches: _Patches) -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as megatron_random
    import megatron.core.transformer.utils as transformer_utils
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    patches.set(torch.cuda, "current_device", lambda: _CPU)
    patches.set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    patches.set(torch.cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    patches.set(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    patches.set(megatron_random, "_get_cuda_rng_state",
                lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    patches.set(megatron_random, "_set_cuda_rng_state",
                lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        ones = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for module in (transformer_utils, fused_softmax):
        patches.set(module, "get_default_causal_mask", causal_mask)
        patches.set(module, "get_sliding_window_causal_mask", sliding_window_mask)
    for name in _MODULES_WITH_CUDA_LITERALS:
        patches.set(importlib.import_module(name), "torch", _TorchWithCpuForCuda())
    # Grad clipping asserts `torch.cuda.FloatTensor` grads before scaling them.
    patches.set(importlib.import_module("megatron.core.optimizer.optimizer"), "clip_grad_by_total_norm_fp32",
                _clip_by_total_norm)
    for optimizer_class in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        patches.set(optimizer_class, "__init__", _with_cuda_type_names(optimizer_class.__init__))
    # On CPU the "GPU" RNG states are the CPU generator's, so the tracker's check that forks leave the
    # CPU generator alone would warn on every dropout region.
    patches.set_level(logging.getLogger(megatron_random.__name__), logging.ERROR)


_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)


def _with_cuda_type_names(init):
    """An optimizer constructor during which CPU tensors' `type()` names the CUDA type megatron expects (once, also
    when a nested entry wraps the constructor again)."""

    @functools.wraps(init)
    def init_on_cpu(self, *args, **kwargs):
        tensor_type = torch.Tensor.type

        def cuda_type_name(tensor, dtype=None, non_blocking=False, **kw):
            if dtype is None and tensor.device.type == "cpu":
                name = tensor_type(tensor)
                return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            return tensor_type(tensor, dtype, non_blocking, **kw)

        torch.Tensor.type = cuda_type_name
        try:
            init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = tensor_type

    return init_on_cpu


def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's `clip_grad_by_total_norm_fp32`, on CPU grads."""
    coefficient = max_norm / (total_norm + 1.0e-6)
    if coefficient < 1.0:
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(coefficient)


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


class _TorchWithCpuForCuda:
    """`torch` as seen by one megatron module: tensor factories map device "cuda" to the CPU."""

    def __getattr__(self, name):
        if name == "cuda":
            return _CUDA_STREAMS_ON_CPU
        attribute = getattr(torch, name)
        if name not in _FACTORIES:
            return attribute

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = _CPU
            return attribute(*args, **kwargs)

        return factory


class _NoOpStream:
    """A CUDA stream or event stand-in: on the CPU every operation is already in order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args):
        pass

    def wait_stream(self, *args):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


class CudaStreamsOnCpu:
    """`torch.cuda` with streams, events and synchronisation as no-ops, the rest as is."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    Stream = Event = _NoOpStream

    @staticmethod
    def current_stream(*args):
        return _NoOpStream()

    @staticmethod
    def stream(*args):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(*args):
        pass


_CUDA_STREAMS_ON_CPU = CudaStreamsOnCpu()
