"""memcompile: a torch.compile backend that makes training fit in less memory, exactly.

    cm = torch.compile(model, backend="memcompile", options={"runtime": "eager"})

`import memcompile` registers the backend; so does torch's own lookup of the
`torch_dynamo_backends` entry point, without any import.
"""

from __future__ import annotations

from memcompile.config import Options, StreamOptions
from memcompile.errors import (
    MemcompileError,
    MemcompileWarning,
    MemoryBudgetError,
    NotAvailableError,
    OptionsError,
    PassError,
)
from memcompile.explainer import explain
from memcompile.measure import Measurement, measure
from memcompile.meta import Decision
from memcompile import optim  # GaLore, Natural GaLore and lowrank, as memcompile.optim

__all__ = [
    "Decision", "Measurement", "MemcompileError", "MemcompileWarning", "MemoryBudgetError", "NotAvailableError",
    "Options", "OptionsError", "PassError", "StreamOptions", "explain", "measure", "optim",
]
__version__ = "0.1.0"

BACKEND_NAME = "memcompile"


def _register_backend() -> None:
    """Register the backend by name unless torch knows it already, or is loading it.

    torch's entry-point lookup imports this package and then registers the name itself; when it
    does, `_BACKENDS` already holds the entry point, and registering here would make torch's own
    registration fail as a duplicate.
    """
    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or registry._BACKENDS.get(BACKEND_NAME) is not None:
        return
    from memcompile.backend import memcompile

    registry.register_backend(memcompile, name=BACKEND_NAME)


_register_backend()
