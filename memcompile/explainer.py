"""`memcompile.explain`: compile a training step, run it, and report every memory decision.

The report holds, per captured graph, the code before and after each pass, the forward and
backward memcompile made, its decisions (what is saved, what is recomputed, why, how many
bytes), the simulated memory timeline, and the peaks measured on a second run of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from memcompile.backend import check_available, memcompile
from memcompile.config import Options
from memcompile.measure import allocator_peak, tracked_peak
from memcompile.report import GraphRecord, Report, recording


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", output)
    if loss is None:
        raise TypeError("explain needs a loss: the output's `.loss` is None (pass labels?)")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
               else type(loss).__name__)
        raise TypeError(
            "explain needs a function that returns a scalar loss, or a module whose output has "
            f"a scalar `.loss`; got {got}"
        )
    return loss


def _autograd_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose `.grad` a backward from `loss` fills: parameters a function closes
    over included, found by walking the autograd graph to its AccumulateGrad nodes."""
    leaves: dict[int, torch.Tensor] = {}
    seen: set[Any] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves[id(fn.variable)] = fn.variable
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return list(leaves.values())


class _GradsKeptAside:
    """Sets the step's leaves' gradients aside as they are found, and puts them back at exit.

    Every step then starts with no gradients, as the simulated one does, and the user's
    gradients are left as they were.
    """

    def __init__(self) -> None:
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def clear(self, leaves: list[torch.Tensor]) -> None:
        for t in leaves:
            self.saved.setdefault(id(t), (t, t.grad))
            t.grad = None

    def __enter__(self) -> _GradsKeptAside:
        return self

    def __exit__(self, *exc: object) -> None:
        for t, grad in self.saved.values():
            t.grad = grad


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
    The gradients of the step's leaves (parameters, closed over or not, and inputs) are
    left as they were.
    """
    opts = Options.from_mapping(options)
    check_available(opts)
    kwargs = dict(example_kwargs or {})

    def backend(gm: Any, inputs: Any) -> Any:
        return memcompile(gm, inputs, opts)

    compiled = torch.compile(fn_or_module, backend=backend)

    with _GradsKeptAside() as grads:

        def step() -> None:
            loss = _loss_of(compiled(*example_inputs, **kwargs))
            leaves = _autograd_leaves(loss)
            grads.clear(leaves)
            if loss.requires_grad:
                loss.backward()
            # Cleared at the end too, so that frees of gradients from before the step stay out
            # of the measured peak.
            grads.clear(leaves)

        with recording() as records:
            step()
        measured: dict[str, int] = {}
        if measure:
            measured["allocator"] = allocator_peak(step)
            if opts.runtime == "eager":
                measured["tracked"] = tracked_peak(step)
    return Report(records=list(records), options=opts, measured=measured)


__all__ = ["GraphRecord", "Report", "explain"]
