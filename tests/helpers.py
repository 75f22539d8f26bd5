"""Shared test helpers: tiny model builders, one-step training, and gradient comparison.

Exactness (docs/design.md, "Exactness, defined") is measured per parameter as
``‖g − g_ref‖ / ‖g_ref‖`` over the whole tensor, worst over all parameters and the loss:

- float64 against float64 eager: at most :data:`FLOAT64_TOL`;
- float32: at most :func:`float32_tolerance` of eager float32's own error against a float64
  twin of the same model (same weights, cast).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch._dynamo
from torch import nn

FLOAT64_TOL = 1e-10
"""Worst relative error allowed in float64 against float64 eager."""

FLOAT32_FLOOR = 1e-6
"""The float32 tolerance never goes below this, however exact eager float32 happens to be."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 over the whole tensor; ``b`` is the reference.

    Two all-zero tensors agree exactly (0.0); a nonzero ``a`` against an all-zero reference is
    infinitely wrong. Shapes must match. A gradient that is mathematically zero (a bias before
    BatchNorm, LayerNorm over one feature) is roundoff in eager, so test models avoid them.
    """
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs reference {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    diff, ref = torch.linalg.vector_norm(a - b).item(), torch.linalg.vector_norm(b).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (parameter names without ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def grad_errors(model: nn.Module, ref_model: nn.Module) -> dict[str, float]:
    """Relative error of each parameter's ``.grad`` against ``ref_model``'s, by parameter name.

    Parameters are matched by name (a compiled wrapper is unwrapped first). A parameter whose
    grad is None in both is skipped; None in one model only, or differing names, fail.
    """
    params = dict(unwrap(model).named_parameters())
    ref_params = dict(unwrap(ref_model).named_parameters())
    if params.keys() != ref_params.keys():
        raise AssertionError(
            f"parameter names differ: {sorted(params.keys() ^ ref_params.keys())}"
        )
    errors: dict[str, float] = {}
    for name, p in params.items():
        g, g_ref = p.grad, ref_params[name].grad
        if g is None and g_ref is None:
            continue
        if g is None or g_ref is None:
            which = "the model" if g is None else "the reference"
            raise AssertionError(f"parameter {name!r}: grad is None in {which} only")
        errors[name] = relative_error(g, g_ref)
    return errors


def max_grad_error(model: nn.Module, ref_model: nn.Module) -> float:
    """The worst of :func:`grad_errors` (0.0 when no parameter has a grad)."""
    return max(grad_errors(model, ref_model).values(), default=0.0)


def worst_error(loss: torch.Tensor, ref_loss: torch.Tensor, model: nn.Module,
                ref_model: nn.Module) -> tuple[float, str]:
    """Worst relative error over the loss and every gradient, and what it was measured on."""
    errors = {"loss": relative_error(loss, ref_loss), **grad_errors(model, ref_model)}
    name = max(errors, key=errors.__getitem__)
    return errors[name], name


def step_error(step: Callable[[Any], torch.Tensor], model: nn.Module, ref_model: nn.Module,
               batch: Mapping[str, Any]) -> tuple[float, str]:
    """`step(batch)`, a compiled loss of `model`, and `ref_model(**batch).loss` eagerly, each
    backpropagated from no gradients: the worst relative error (`worst_error`)."""
    model.zero_grad(set_to_none=True)
    ref_model.zero_grad(set_to_none=True)
    loss = step(batch)
    loss.backward()
    ref_loss = ref_model(**batch).loss
    ref_loss.backward()
    return worst_error(loss.detach(), ref_loss.detach(), model, ref_model)


def assert_float32_rule(loss: torch.Tensor, model: nn.Module, eager32: nn.Module,
                        ref64: nn.Module, batch: Mapping[str, Any], what: str = "", *,
                        logits: torch.Tensor | None = None) -> None:
    """Hold a compiled float32 step (its `loss`, `model`'s gradients, and the `logits` it
    returned, if given) to the design's float32 rule against float64 eager (`ref64`): at most
    `float32_tolerance` of eager float32's own error (`eager32`, both run here on copies of
    `batch`)."""
    out64 = ref64(**clone_inputs(batch))
    out64.loss.backward()
    out32 = eager32(**clone_inputs(batch))
    out32.loss.backward()
    err, where = worst_error(loss.detach(), out64.loss.detach(), model, ref64)
    eager_err, _ = worst_error(out32.loss.detach(), out64.loss.detach(), eager32, ref64)
    assert err <= float32_tolerance(eager_err), (
        f"{what}: worst relative error {err:.3e} at {where}; eager float32's {eager_err:.3e}")
    if logits is not None:
        err = relative_error(logits.detach(), out64.logits.detach())
        eager_err = relative_error(out32.logits.detach(), out64.logits.detach())
        assert err <= float32_tolerance(eager_err), (
            f"{what}: logits' relative error {err:.3e}; eager float32's {eager_err:.3e}")


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` with a dict (as keywords), a tuple/list (as positionals) or one value."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def train_step(
    model: nn.Module,
    batch_or_inputs: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Zero the grads, run forward and backward once, return the (detached) loss.

    The loss is ``loss_fn(output)`` when given, else ``output.loss`` when the output has one
    (causal LMs), else the output itself, which must be a scalar tensor. Grads of inputs that
    require grad are the caller's to reset.
    """
    model.zero_grad(set_to_none=True)
    out = call_model(model, batch_or_inputs)
    if loss_fn is not None:
        loss = loss_fn(out)
    else:
        loss = out.loss if hasattr(out, "loss") else out
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise AssertionError(f"train_step needs a scalar loss, got {type(loss).__name__}")
    loss.backward()
    return loss.detach()


def clone_model(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy with identical weights (and tied weights still tied), optionally cast."""
    twin = copy.deepcopy(unwrap(model))
    return twin if dtype is None else twin.to(dtype)


def clone_inputs(inputs: Any, *, dtype: torch.dtype | None = None) -> Any:
    """Fresh copies of the tensors in ``inputs`` (dict, tuple/list or tensor), leaves again.

    Floating tensors are cast to ``dtype`` when given; ``requires_grad`` is kept, so each copy
    gathers its own ``.grad``. Integer tensors (ids, labels) are copied unchanged.
    """
    if isinstance(inputs, Mapping):
        return {k: clone_inputs(v, dtype=dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(clone_inputs(v, dtype=dtype) for v in inputs)
    if not isinstance(inputs, torch.Tensor):
        return inputs
    copied = inputs.detach().clone()
    if dtype is not None and copied.is_floating_point():
        copied = copied.to(dtype)
    return copied.requires_grad_(inputs.requires_grad)


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` in float64 with torch's global RNG seeded, leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().double()


def compiled_and_reference(model: nn.Module, **options: Any) -> tuple[nn.Module, nn.Module]:
    """``model`` compiled with memcompile, and an eager twin with identical weights to compare."""
    ref = clone_model(model)
    return compile_memcompile(model, **options), ref


def compile_memcompile(model: nn.Module, *, dynamic: bool | None = None, reset: bool = True,
                       **options: Any) -> nn.Module:
    """``torch.compile(model, backend="memcompile", options=options)``.

    ``torch._dynamo.reset()`` first (unless ``reset=False``) so graphs compiled by earlier tests
    neither count towards the recompile limit nor get reused with other options.
    """
    if reset:
        torch._dynamo.reset()
    return torch.compile(model, backend="memcompile", dynamic=dynamic, options=options)


def inductor_graphs() -> int:
    """How many graphs Inductor compiled or took from its cache since ``counters`` were cleared
    (``torch._dynamo.utils.counters.clear()``): two per training graph, forward and backward."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return c["fxgraph_cache_miss"] + c["fxgraph_cache_hit"] + c["fxgraph_cache_bypass"]


def float32_tolerance(eager_float32_error: float) -> float:
    """The float32 bound: ``max(1.5 × eager float32's own error, FLOAT32_FLOOR)``."""
    return max(1.5 * eager_float32_error, FLOAT32_FLOOR)


def float32_errors(
    compiled: nn.Module,
    eager32: nn.Module,
    ref64: nn.Module,
    inputs: Any,
) -> tuple[tuple[float, str], tuple[float, str]]:
    """One step of each model; worst errors of ``compiled`` and of ``eager32`` against ``ref64``.

    ``compiled`` (a compiled float32 model) and ``eager32`` must hold the same weights, and
    ``ref64`` those weights cast to float64; ``inputs`` are cast for ``ref64``. Returns
    ``((compiled error, where), (eager float32 error, where))``.
    """
    loss64 = train_step(ref64, clone_inputs(inputs, dtype=torch.float64))
    loss32 = train_step(eager32, clone_inputs(inputs))
    loss_c = train_step(compiled, clone_inputs(inputs))
    return (worst_error(loss_c, loss64, compiled, ref64),
            worst_error(loss32, loss64, eager32, ref64))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": nn.functional.gelu,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "silu": nn.functional.silu,
}
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATIONS)
"""Activation names :class:`MLPStack` accepts."""


class MLPStack(nn.Module):
    """A small MLP: one block per consecutive pair of ``widths``.

    A block is Linear, then optionally LayerNorm, then its activation; with ``residual`` the
    block's input is added back, through a bias-free Linear where the widths differ.
    """

    def __init__(self, widths: Sequence[int], activations: Sequence[str], *,
                 layer_norm: bool = False, residual: bool = False) -> None:
        super().__init__()
        if len(activations) != len(widths) - 1:
            raise ValueError("need one activation per block (len(widths) - 1)")
        self.activations = list(activations)
        self.residual = residual
        pairs = list(zip(widths[:-1], widths[1:]))
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in pairs)
        self.norms = nn.ModuleList(nn.LayerNorm(o) if layer_norm else nn.Identity()
                                   for _, o in pairs)
        self.shortcuts = nn.ModuleList(
            nn.Identity() if i == o else nn.Linear(i, o, bias=False) for i, o in pairs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., widths[0])`` to ``(..., widths[-1])``."""
        for linear, norm, shortcut, act in zip(self.linears, self.norms, self.shortcuts,
                                               self.activations):
            y = _ACTIVATIONS[act](norm(linear(x)))
            x = y + shortcut(x) if self.residual else y
        return x


LOSSES: tuple[str, ...] = ("mse", "cross_entropy", "dot")
"""Loss kinds :class:`WithLoss` accepts."""


class WithLoss(nn.Module):
    """Wraps a module so ``forward(x, target)`` returns a scalar loss of its output.

    ``"mse"``: ``mean((out - target)²)``; ``"dot"``: ``sum(out * target)``; both take a float
    ``target`` shaped like the output. ``"cross_entropy"``: the last dimension holds class
    scores and ``target`` the class indices (the output's shape without its last dimension).
    """

    def __init__(self, module: nn.Module, kind: str = "mse") -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; valid: {list(LOSSES)}")
        self.module = module
        self.kind = kind

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar loss of ``self.module(x)`` against ``target``."""
        out = self.module(x)
        if self.kind == "cross_entropy":
            return nn.functional.cross_entropy(out.flatten(0, -2), target.flatten())
        if self.kind == "dot":
            return (out * target).sum()
        return (out - target).pow(2).mean()
