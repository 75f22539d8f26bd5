"""`memcompile.explain`: compile a training step, run it, and report every memory decision.

The report holds, per captured graph, the code before and after each pass, the forward and
backward memcompile made, its decisions (what is saved, what is recomputed, why, how many
bytes), the simulated memory timeline, and the peaks measured on a second run of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from memcompile.backend import memcompile
from memcompile.config import Options
from memcompile.measure import allocator_peak, tracked_peak
from memcompile.report import GraphRecord, Report, recording


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            "explain needs a function that returns a scalar loss, or a module whose output has "
            f"a scalar `.loss`; got {type(output).__name__}"
        )
    return loss


def _leaves(fn_or_module: Any, inputs: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    """The tensors whose `.grad` a step fills: the module's parameters and leaf inputs."""
    params = list(fn_or_module.parameters()) if isinstance(fn_or_module, torch.nn.Module) else []
    tensors = [t for t in [*inputs, *kwargs.values()] if isinstance(t, torch.Tensor)]
    return params + [t for t in tensors if t.is_leaf and t.requires_grad]


@contextlib.contextmanager
def _grads_kept_aside(leaves: list[torch.Tensor]) -> Iterator[None]:
    """Run the block with the leaves' gradients unset, and put the user's back afterwards."""
    saved = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    try:
        yield
    finally:
        for t, g in zip(leaves, saved):
            t.grad = g


def explain(
    fn_or_module: Callable[..., Any] | torch.nn.Module,
    *example_inputs: Any,
    options: Mapping[str, Any] | Options | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    measure: bool = True,
) -> Report:
    """Compile `fn_or_module` with memcompile, run one training step, and report what it did.

    `fn_or_module(*example_inputs, **example_kwargs)` must return a scalar loss (or an object
    whose `.loss` is one). With `measure=True` a second step is measured: the allocator peak
    always, and the tracked peak in the eager runtime (the one the simulator predicts exactly).
    The module's gradients are left as they were.
    """
    opts = Options.from_mapping(options)
    kwargs = dict(example_kwargs or {})

    def backend(gm: Any, inputs: Any) -> Any:
        return memcompile(gm, inputs, opts)

    compiled = torch.compile(fn_or_module, backend=backend)

    leaves = _leaves(fn_or_module, example_inputs, kwargs)

    def step() -> None:
        # Every step starts with no gradients, as the simulated one does; clearing them at the
        # end keeps frees of gradients from before the step out of the measured peak.
        loss = _loss_of(compiled(*example_inputs, **kwargs))
        if loss.requires_grad:
            loss.backward()
        for t in leaves:
            t.grad = None

    with _grads_kept_aside(leaves):
        with recording() as records:
            step()
        measured: dict[str, int] = {}
        if measure:
            measured["allocator"] = allocator_peak(step)
            if opts.runtime == "eager":
                measured["tracked"] = tracked_peak(step)
    return Report(records=list(records), options=opts, measured=measured)


__all__ = ["GraphRecord", "Report", "explain"]
