"""The pass registry: every pass by name, and the default pipeline in order.

An unknown name is an error that lists the valid ones. Pass modules are imported here, once, so
that importing the registry is enough to know every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import torch.fx as fx

from memcompile.errors import UnknownPassError

PassFn = Callable[..., fx.GraphModule]
"""`(gm, example_inputs, *, options) -> gm`"""

PASSES: dict[str, PassFn] = {}
_DEFAULT_ORDER: list[str] = []


def register_pass(name: str, *, default: bool = False) -> Callable[[PassFn], PassFn]:
    """Register a pass under `name`; `default=True` appends it to the default pipeline."""

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES and PASSES[name] is not fn:
            raise ValueError(f"a pass named {name!r} is already registered")
        PASSES[name] = fn
        if default and name not in _DEFAULT_ORDER:
            _DEFAULT_ORDER.append(name)
        return fn

    return wrap


def get_pass(name: str) -> PassFn:
    """The pass registered as `name`; an unknown name raises, listing the valid ones."""
    _load_builtin_passes()
    try:
        return PASSES[name]
    except KeyError:
        raise UnknownPassError(f"unknown pass {name!r}; valid passes: {', '.join(PASSES)}") \
            from None


def pass_names() -> list[str]:
    """Every registered pass name."""
    _load_builtin_passes()
    return list(PASSES)


def default_pipeline() -> list[str]:
    """The default pipeline, in the order it runs."""
    _load_builtin_passes()
    return list(_DEFAULT_ORDER)


def resolve_pipeline(passes: Sequence[str] | None, disable: Sequence[str]) -> list[str]:
    """The pass names to run: `passes` (or the default pipeline) less those in `disable`."""
    names = default_pipeline() if passes is None else list(passes)
    for name in [*names, *disable]:
        get_pass(name)
    return [n for n in names if n not in set(disable)]


def _load_builtin_passes() -> None:
    # Imported lazily: pass modules import analyses that import torch internals, and the
    # registry must be importable from the config module without a cycle.
    # The default pipeline runs in import order.
    from memcompile.passes import remove_noops  # noqa: F401
    from memcompile.passes import remat_plan  # noqa: F401, I001
