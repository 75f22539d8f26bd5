"""Low-rank projected optimizers: GaLore and Natural GaLore, and the swap of an Adam/AdamW.

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = memcompile.optim.lowrank(opt, model=model, rank=16)   # a new optimizer

``GaLoreAdamW`` and ``NaturalGaLoreAdamW`` take galore-torch's parameter groups; the math of one
weight's step is :func:`memcompile.optim.functional.projected_adamw_step`.
"""

from memcompile.optim.adamw import GaLoreAdamW, NaturalGaLoreAdamW
from memcompile.optim.functional import adamw_step, projected_adamw_step
from memcompile.optim.memory import state_bytes
from memcompile.optim.projector import PROJ_TYPES, SVD_METHODS, ProjectorSpec
from memcompile.optim.selection import select_weights
from memcompile.optim.swap import METHODS, lowrank

__all__ = [
    "GaLoreAdamW", "METHODS", "NaturalGaLoreAdamW", "PROJ_TYPES", "ProjectorSpec", "SVD_METHODS",
    "adamw_step", "lowrank", "projected_adamw_step", "select_weights", "state_bytes",
]
