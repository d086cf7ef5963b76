"""megatron-simreg: SimReg embedding-similarity regularization and AdaGC for Megatron-Core pretraining.

The regularizers (`megatron_simreg.simreg`, `megatron_simreg.adagc`) are plain PyTorch and import no
Megatron; the Megatron glue (model, training entry, optimizer hooks) lives in its own modules.
"""

__version__ = "0.1.0"
