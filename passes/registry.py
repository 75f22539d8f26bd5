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
_RANK: dict[str, int] = {}
_DEFAULT: set[str] = set()
_RUNTIMES: dict[str, tuple[str, ...] | None] = {}


def register_pass(name: str, *, default: bool = False, rank: int = 0,
                  runtimes: tuple[str, ...] | None = None) -> Callable[[PassFn], PassFn]:
    """Register a pass under `name`; `default=True` puts it in the default pipeline, where
    passes run by `rank` (lower first), whatever order their modules were imported in.
    `runtimes`: the runtimes whose default pipeline holds it (None: every one)."""

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES and PASSES[name] is not fn:
            raise ValueError(f"a pass named {name!r} is already registered")
        PASSES[name] = fn
        _RANK[name] = rank
        _RUNTIMES[name] = runtimes
        if default:
            _DEFAULT.add(name)
        return fn

    return wrap


def _ranked(names: set[str] | list[str]) -> list[str]:
    return sorted(names, key=lambda n: (_RANK[n], n))


def get_pass(name: str) -> PassFn:
    """The pass registered as `name`; an unknown name raises, listing the valid ones."""
    _load_builtin_passes()
    try:
        return PASSES[name]
    except KeyError:
        raise UnknownPassError(
            f"unknown pass {name!r}; valid passes: {', '.join(_ranked(list(PASSES)))}"
        ) from None


def pass_names() -> list[str]:
    """Every registered pass name, in pipeline order."""
    _load_builtin_passes()
    return _ranked(list(PASSES))


def default_pipeline(runtime: str | None = None) -> list[str]:
    """The default pipeline for `runtime` (None: every runtime's passes), in the order it runs."""
    _load_builtin_passes()
    return _ranked({n for n in _DEFAULT
                    if runtime is None or _RUNTIMES[n] is None or runtime in _RUNTIMES[n]})


def resolve_pipeline(passes: Sequence[str] | None, disable: Sequence[str],
                     runtime: str | None = None) -> list[str]:
    """The pass names to run: `passes` (or `runtime`'s default pipeline) less those in
    `disable`."""
    names = default_pipeline(runtime) if passes is None else list(passes)
    for name in [*names, *disable]:
        get_pass(name)
    return [n for n in names if n not in set(disable)]


def _load_builtin_passes() -> None:
    # Imported lazily: pass modules import analyses that import torch internals, and the
    # registry must be importable from the config module without a cycle.
    from memcompile.passes import embedding_backward, remat_plan, remove_noops  # noqa: F401
