"""Which weights of a model :func:`memcompile.optim.lowrank` projects.

Every ``nn.Linear`` weight, except:

- one that is also an ``nn.Embedding``'s weight (the same tensor object: tied embeddings), and
- the output head: ``model.get_output_embeddings()`` when the model has it (Hugging Face models),
  otherwise the last ``nn.Linear`` in ``model.modules()`` order (the LM head of the built-in
  Llama, the output projection of the built-in DiT).

Embeddings, norms, biases and the head stay on the optimizer's original rule, as in GaLore's
training scripts.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def output_head(model: nn.Module) -> nn.Module | None:
    """The module producing the model's output, by the rule in the module docstring."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def select_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → weight of every ``nn.Linear`` weight to project, in module order, each once."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = output_head(model)
    head_weight = getattr(head, "weight", None)
    chosen: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        if id(module.weight) in embedded:
            log.debug("lowrank: %s.weight is tied to an embedding; not projected", name)
        elif module.weight is head_weight:
            log.debug("lowrank: %s is the output head; not projected", name)
        else:
            chosen[f"{name}.weight"] = module.weight
    return chosen
