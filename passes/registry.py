"""The pass registry: every pass by name, and the default pipelines in order.

Passes run on one of two graphs, each with its own pipeline:

- "joint": AOTAutograd's joint forward+backward graph, before it is split (`plan_remat` and the
  passes that prepare for it);
- "stream": the forward aten graph StreamBP runs (`options["stream"]`): the eager attention
  and mask rewrites, and the stream plan.

`options.passes` names passes of either graph; each pipeline runs those of its own graph, in the
order given. An unknown name is an error that lists the valid ones. Pass modules are imported
here, once, so that importing the registry is enough to know every pass.
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
_GRAPH: dict[str, str] = {}

GRAPHS = ("joint", "stream")
"""The graphs passes run on, each with its own pipeline."""


def register_pass(name: str, *, default: bool = False, rank: int = 0,
                  runtimes: tuple[str, ...] | None = None,
                  graph: str = "joint") -> Callable[[PassFn], PassFn]:
    """Register a pass under `name`; `default=True` puts it in the default pipeline of its
    `graph` ("joint" or "stream"), where passes run by `rank` (lower first), whatever order
    their modules were imported in. `runtimes`: the runtimes whose default pipeline holds it
    (None: every one)."""
    if graph not in GRAPHS:
        raise ValueError(f"pass {name!r}: unknown graph {graph!r}; valid: {', '.join(GRAPHS)}")

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES and PASSES[name] is not fn:
            raise ValueError(f"a pass named {name!r} is already registered")
        PASSES[name] = fn
        _RANK[name] = rank
        _RUNTIMES[name] = runtimes
        _GRAPH[name] = graph
        if default:
            _DEFAULT.add(name)
        return fn

    return wrap


def _ranked(names: set[str] | list[str]) -> list[str]:
    return sorted(names, key=lambda n: (GRAPHS.index(_GRAPH[n]), _RANK[n], n))


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


def graph_of(name: str) -> str:
    """The graph ("joint" or "stream") the pass `name` runs on."""
    get_pass(name)
    return _GRAPH[name]


def default_pipeline(runtime: str | None = None, graph: str = "joint") -> list[str]:
    """The default pipeline of `graph` for `runtime` (None: every runtime's passes), in the
    order it runs."""
    _load_builtin_passes()
    return _ranked({n for n in _DEFAULT if _GRAPH[n] == graph and (
        runtime is None or _RUNTIMES[n] is None or runtime in _RUNTIMES[n])})


def resolve_pipeline(passes: Sequence[str] | None, disable: Sequence[str],
                     runtime: str | None = None, graph: str = "joint") -> list[str]:
    """The pass names to run on `graph`: those of `passes` that run on it, in their order (or
    its default pipeline for `runtime`), less those in `disable`."""
    for name in [*(passes or ()), *disable]:
        get_pass(name)
    names = (default_pipeline(runtime, graph) if passes is None
             else [n for n in passes if _GRAPH[n] == graph])
    return [n for n in names if n not in set(disable)]


def _load_builtin_passes() -> None:
    # Imported lazily: pass modules import analyses that import torch internals, and the
    # registry must be importable from the config module without a cycle.
    from memcompile.passes import (causal_mask, document_mask,  # noqa: F401
                                   eager_attention, embedding_backward, key_mask, remat_plan,
                                   remove_noops, stream_plan)
