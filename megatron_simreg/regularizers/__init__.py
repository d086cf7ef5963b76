"""The similarity regularizers one run can train with: SimReg and the baselines of the paper's Table 1.

Each is plain PyTorch (+ torch.distributed), one file each, registered here by name with its own settings
(a dataclass: the keys of the config's `regularizer:` section besides `name` and `weight`; SimReg's are the
`simreg:` section), its default weight, and the state it keeps in the model, if any (CPretrain's learnable
temperature, SCE's EMA target). `compute(inputs, settings, state)` returns a `RegularizerOutput`: a sum of
per-sequence terms that the objective adds, times its weight, to the cross-entropy's token sum.
docs/baselines.md has each formula, its source and the adaptation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_simreg.regularizers.base import PairingSettings, RegularizerInputs, RegularizerOutput
from megatron_simreg.regularizers.cpretrain import CPretrainSettings, CPretrainState, cpretrain_loss
from megatron_simreg.regularizers.creg import CRegSettings, creg_loss
from megatron_simreg.regularizers.sce import SCESettings, SCEState, sce_loss
from megatron_simreg.regularizers.simcse import SimCSESettings, simcse_loss
from megatron_simreg.regularizers.simreg import SimRegSettings, simreg_output

__all__ = ["REGISTRY", "STATE_KEYS", "Regularizer", "RegularizerInputs", "RegularizerOutput", "PairingSettings", "get"]

STATE_KEYS = "regularizer_state."
"""How a checkpoint's keys of a regularizer's state begin (the GPTModel's `regularizer_state`): training-only,
left out of an export and of a weights-only load."""


@dataclass(frozen=True)
class Regularizer:
    """A registered regularizer.

    default_weight(hidden_size): its weight when the config says `auto` (or nothing, for the baselines).
    state_names(settings): the top-level names of the state it keeps in the model's checkpoint (under
    STATE_KEYS), known before a model is built (a resume with another regularizer is refused before anything is
    built); none: it keeps no state.
    state(settings, model, twin): that state, a module kept in `model` (a megatron-core GPTModel, whose `config`
    is its TransformerConfig), built only where state_names is not empty; `twin()` builds another model of the
    same layers in fp32 (SCE's momentum encoder).
    needs: what the objective must provide besides the final hidden states ("label_embeddings", "logits",
    "second_view", "target_view").
    """

    name: str
    settings: type
    compute: Callable[..., RegularizerOutput]
    default_weight: Callable[[int], float]
    state: Callable[..., torch.nn.Module | None] = lambda *args: None
    state_names: Callable[[object], frozenset] = lambda settings: frozenset()
    needs: Callable[[object], frozenset] = lambda settings: frozenset()


def _views(settings) -> frozenset:
    return frozenset({"second_view"}) if getattr(settings, "views", "dropout") == "forward" else frozenset()


REGISTRY: dict[str, Regularizer] = {
    "simreg": Regularizer(
        "simreg", SimRegSettings, simreg_output, default_weight=lambda hidden: 10.0 * math.sqrt(hidden / 1024),
    ),
    "simcse": Regularizer("simcse", SimCSESettings, simcse_loss, default_weight=lambda hidden: 1.0, needs=_views),
    "cpretrain": Regularizer(
        "cpretrain", CPretrainSettings, cpretrain_loss, default_weight=lambda hidden: 1.0,
        state=lambda settings, model, twin: CPretrainState(settings, model.config.params_dtype,
                                                           model.config.sequence_parallel),
        state_names=lambda settings: frozenset({"log_scale"} if settings.learnable else ()),
        needs=lambda settings: frozenset({"label_embeddings"}),
    ),
    "creg": Regularizer(
        "creg", CRegSettings, creg_loss, default_weight=lambda hidden: 1.0,
        needs=lambda settings: _views(settings) | ({"logits"} if settings.consistency_weight > 0 else set()),
    ),
    "sce": Regularizer(
        "sce", SCESettings, sce_loss, default_weight=lambda hidden: 1.0,
        state=lambda settings, model, twin: SCEState(settings, model, twin()),
        state_names=lambda settings: frozenset({"encoder"} if settings.target == "ema" else ()),
        needs=lambda settings: _views(settings) | ({"target_view"} if settings.target == "ema" else set()),
    ),
}


def get(name: str) -> Regularizer:
    if name not in REGISTRY:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]
