"""SimReg (arXiv 2605.08809, Eq. 3) in the registry: `megatron_simreg.simreg.simreg_loss` and its statistics.

Its settings are the config's `simreg:` section (temperature, mode, chunk_size, reduction, block_size); the
layer it reads is chosen by the objective (`simreg.layer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_simreg.regularizers.base import PairingSettings, RegularizerInputs, RegularizerOutput, check_choice
from megatron_simreg.simreg import simreg_loss


@dataclass
class SimRegSettings(PairingSettings):
    temperature: float = 0.01
    reduction: str = "group"  # per sequence: mean over its label groups ("group") or over its tokens ("token")

    def __post_init__(self):
        super().__post_init__()
        check_choice("reduction", self.reduction, ("group", "token"))


def simreg_output(inputs: RegularizerInputs, settings: SimRegSettings, state=None) -> RegularizerOutput:
    out = simreg_loss(
        inputs.hidden, inputs.labels, inputs.loss_mask, temperature=settings.temperature, chunk_size=settings.chunk(),
        reduction=settings.reduction, sequence_first=True, process_group=inputs.sequence_group,
        sequence_layout=inputs.sequence_layout, block_size=settings.block_size,
    )
    stats = {"simreg": out.loss, "simreg lsr": out.lsr_mean, "simreg live anchors": out.live_fraction,
             "simreg negative angle": out.negative_angle}
    return RegularizerOutput(out.loss, out.token_weighted_sum, out.tokens, stats)
