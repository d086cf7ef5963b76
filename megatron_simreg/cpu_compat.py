"""Let megatron-core's GPT and MoE code run on CPU (tests, the demo), over gloo when multi-process.

megatron-core places tensors with `torch.cuda.current_device()`, builds the default causal mask on
"cuda", and keeps its model-parallel RNG states through `torch.cuda.get_rng_state`/`manual_seed`.
On a machine without CUDA, `enable_cpu_compat()` points exactly those at the CPU:

- `torch.cuda.current_device()` returns the CPU device (RoPE frequencies, attention, linear-layer
  buffers, router and loss tensors take it as `device=`);
- `torch.cuda.get_rng_state`/`set_rng_state`/`manual_seed` act on the CPU generator, and
  megatron's `_get_cuda_rng_state`/`_set_cuda_rng_state` likewise, so `CudaRNGStatesTracker`
  forks (dropout regions, per-rank initialisation) keep working;
- `get_default_causal_mask`/`get_sliding_window_causal_mask` build their masks on the CPU.

Nothing changes where CUDA is available: the function returns without touching anything. The rest of
the project never needs to know; only the entry points call this.
"""

import logging

import torch

_ENABLED = False
_CPU = torch.device("cpu")


def enable_cpu_compat() -> bool:
    """Apply the CPU remaps once if CUDA is unavailable; returns whether they are active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as megatron_random
    import megatron.core.transformer.utils as transformer_utils

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    megatron_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        ones = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    # On CPU the "GPU" RNG states are the CPU generator's, so the tracker's check that forks leave the
    # CPU generator alone would warn on every dropout region.
    logging.getLogger(megatron_random.__name__).setLevel(logging.ERROR)
    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = causal_mask
        module.get_sliding_window_causal_mask = sliding_window_mask
    _ENABLED = True
    return True
