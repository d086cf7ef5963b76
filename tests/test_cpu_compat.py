"""`cpu_compat()`: megatron-core runs on CPU inside it, and every remap is undone on leaving it, nested or not."""

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
