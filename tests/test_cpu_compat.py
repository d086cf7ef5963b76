"""`cpu_compat()`: megatron-core runs on CPU inside it, and every remap is undone on leaving it, nested or not."""

import contextlib
import sys

import torch

from megatron_simreg.cpu_compat import cpu_compat


def module_and_class_attributes() -> dict:
    """Identity of every attribute of torch.cuda, every loaded megatron module and the classes they define."""
    import megatron.core.optimizer  # noqa: F401  (the optimizers' modules, whose constructors get wrapped)

    seen = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "torch.cuda" or name.startswith("megatron")):
            continue
        for attribute, value in list(vars(module).items()):
            seen[name, attribute] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for member, inner in list(vars(value).items()):
                    seen[name, attribute, member] = id(inner)
    return seen


def test_everything_patched_is_restored_on_exit_even_when_nested():
    import megatron.core.tensor_parallel.random  # noqa: F401

    before = module_and_class_attributes()
    with cpu_compat() as active:
        assert active and torch.cuda.current_device() == torch.device("cpu")
        with cpu_compat():
            torch.cuda.manual_seed(3)
            assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
        assert torch.cuda.current_device() == torch.device("cpu")  # the outer remaps still hold
        inside = module_and_class_attributes()
    after = module_and_class_attributes()
    assert inside != before  # it did patch
    changed = sorted(key for key in before if after.get(key) != before[key])
    assert not changed, changed



def test_a_bf16_optimizer_builds_inside_nested_entries():
    """megatron's mixed-precision optimizer sorts parameters by their CUDA type names; a nested entry used to rename
    them twice ("torch.cuda.cuda.BFloat16Tensor"), which it refuses: bf16 training stopped in any loop entered from
    inside cpu_compat (a test worker's)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for depth in (1, 2):
        with contextlib.ExitStack() as entries:
            for _ in range(depth):
                entries.enter_context(cpu_compat())
            weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
            optimizer = Float16OptimizerWithFloat16Params(torch.optim.Adam([weight]), OptimizerConfig(bf16=True),
                                                          None, lambda *args: None)
            (main,) = optimizer.fp32_from_float16_groups[0]
            assert main.dtype == torch.float32 and torch.equal(main, weight.float())


def test_compiled_functions_run_eagerly_on_the_cpu_and_compile_again_on_exit():
    """megatron-core's fused functions (`jit_fuser`, torch.compile) run eagerly inside cpu_compat: Inductor's CPU
    code for its bias-dropout-add gives NaN on the first call under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU
    (torch 2.14.1). The layers' bias-dropout-add is residual + x exactly at megatron's dropout 0."""
    from megatron.core.fusions import fused_bias_dropout as bda
    from torch._dynamo.utils import counters

    x, residual = torch.randn(16, 2, 8, requires_grad=True), torch.randn(16, 2, 8, requires_grad=True)
    plus_one = torch.compile(lambda t: t + 1)
    frames = counters["frames"]["total"]
    with cpu_compat():
        assert torch.equal(plus_one(x), x + 1)
        for training in (True, False):
            add = bda.get_bias_dropout_add(training, fused=True)
            assert torch.equal(add((x, None), residual, 0.0), residual + x)
    assert counters["frames"]["total"] == frames, "a function was compiled inside cpu_compat"
    plus_one(x)
    assert counters["frames"]["total"] > frames, "compiling should work again after cpu_compat"
