"""How many bytes an optimizer's state holds."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def state_bytes(optimizer: torch.optim.Optimizer,
                params: Iterable[torch.Tensor] | None = None) -> int:
    """Bytes of the tensors in ``optimizer.state`` for ``params`` (all parameters if None).

    Counts every tensor value of each parameter's state (moments, projector, history, the step
    scalar); a tensor shared between two entries is counted once.
    """
    wanted = None if params is None else {id(p) for p in params}
    seen: set[int] = set()
    total = 0
    for p, state in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total
