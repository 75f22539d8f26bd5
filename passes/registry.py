"""The pass registry: every pass by name, and the default pipelines in order.

Passes run on one of three graphs, each with its own pipeline:

- "capture": Dynamo's graph as captured, before AOTAutograd (`sequence_parallel`, which runs
  only under that option);
- "joint": AOTAutograd's joint forward+backward graph, before it is split (`plan_remat` and the
  passes that prepare for it);
- "stream": the forward aten graph StreamBP runs (`options["stream"]`): the eager attention
  and mask rewrites, and the stream plan.

A pass may belong to an option (`register_pass(..., option="sequence_parallel")`): it is in
the default pipeline only when that option is on, so graphs compiled without it run and list
exactly what they ran before.

`options.passes` names passes of any graph; each pipeline runs those of its own graph, in the
order given. An unknown name is an error that lists the valid ones. Pass modules are imported
here, once, so that importing the registry is enough to know every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch.fx as fx

from memcompile.errors import UnknownPassError

PassFn = Callable[..., fx.GraphModule]
"""`(gm, example_inputs, *, options) -> gm`"""

PASSES: dict[str, PassFn] = {}
_RANK: dict[str, int] = {}
_DEFAULT: set[str] = set()
_RUNTIMES: dict[str, tuple[str, ...] | None] = {}
_GRAPH: dict[str, str] = {}
_OPTION: dict[str, str | None] = {}

GRAPHS = ("capture", "joint", "stream")
"""The graphs passes run on, each with its own pipeline."""


def register_pass(name: str, *, default: bool = False, rank: int = 0,
                  runtimes: tuple[str, ...] | None = None, graph: str = "joint",
                  option: str | None = None) -> Callable[[PassFn], PassFn]:
    """Register a pass under `name`; `default=True` puts it in the default pipeline of its
    `graph` ("capture", "joint" or "stream"), where passes run by `rank` (lower first),
    whatever order their modules were imported in. `runtimes`: the runtimes whose default
    pipeline holds it (None: every one). `option`: the option (an `Options` field) that must be
    on for the default pipeline to hold it (None: always)."""
    if graph not in GRAPHS:
        raise ValueError(f"pass {name!r}: unknown graph {graph!r}; valid: {', '.join(GRAPHS)}")

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES and PASSES[name] is not fn:
            raise ValueError(f"a pass named {name!r} is already registered")
        PASSES[name] = fn
        _RANK[name] = rank
        _RUNTIMES[name] = runtimes
        _GRAPH[name] = graph
        _OPTION[name] = option
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
    """The graph ("capture", "joint" or "stream") the pass `name` runs on."""
    get_pass(name)
    return _GRAPH[name]


def default_pipeline(runtime: str | None = None, graph: str = "joint",
                     options_on: Collection[str] = ()) -> list[str]:
    """The default pipeline of `graph` for `runtime` (None: every runtime's passes), with the
    passes of the options in `options_on`, in the order it runs."""
    _load_builtin_passes()
    return _ranked({n for n in _DEFAULT if _GRAPH[n] == graph and (
        runtime is None or _RUNTIMES[n] is None or runtime in _RUNTIMES[n]) and (
        _OPTION[n] is None or _OPTION[n] in options_on)})


def active_options(options: object) -> set[str]:
    """The options owning passes (`register_pass(option=...)`) that `options` turns on."""
    _load_builtin_passes()
    return {o for o in set(_OPTION.values()) if o is not None and getattr(options, o, False)}


def resolve_pipeline(passes: Sequence[str] | None, disable: Sequence[str],
                     runtime: str | None = None, graph: str = "joint",
                     options_on: Collection[str] = ()) -> list[str]:
    """The pass names to run on `graph`: those of `passes` that run on it, in their order (or
    its default pipeline for `runtime` and `options_on`), less those in `disable`."""
    for name in [*(passes or ()), *disable]:
        get_pass(name)
    names = (default_pipeline(runtime, graph, options_on) if passes is None
             else [n for n in passes if _GRAPH[n] == graph])
    return [n for n in names if n not in set(disable)]


def _load_builtin_passes() -> None:
    # Imported lazily: pass modules import analyses that import torch internals, and the
    # registry must be importable from the config module without a cycle.
    from memcompile.passes import (causal_mask, document_mask,  # noqa: F401
                                   eager_attention, embedding_backward, key_mask, remat_plan,
                                   remove_noops, sequence_parallel, sequence_parallel_grads,
                                   stream_plan)
