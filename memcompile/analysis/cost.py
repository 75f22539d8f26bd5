"""What recomputing an op costs: seconds from its FLOPs and the bytes it moves.

`CostModel(seconds_per_op, seconds_per_byte, seconds_per_flop)` prices one op run by the eager
runtime as a fixed dispatch overhead, plus the bytes it reads and writes at memory bandwidth, plus
its FLOPs (matrix products, convolutions, attention: torch's own FLOP formulas) at the matmul
rate.

A plan depends on the constants only through two ratios, seconds per op and per FLOP over
seconds per byte (the planner compares seconds with seconds: which value frees the most bytes
per second of recompute, and whether a plan recomputes more than one forward). So:

- `CostModel.measured(device, dtype)` times a tiny op, a large add and a matmul on the device, in
  the graph's dtype, with CUDA synchronized around each timing (the work, not the launch), from
  inputs drawn from a private generator (the user's random stream is untouched). The three are
  timed in interleaved rounds and each takes its fastest round: load slows a round, never
  speeds it, and slows the three alike. The two ratios are then rounded to a power of two, so
  timing noise of tens of percent leaves them, and the plan, where they were. Once per process,
  device and dtype.
- `CostModel.fixed(device)` is a table of representative constants per device kind: plans that
  are the same on every run and every machine of that kind, without timing anything.
- `CostModel(**constants)` pins the constants of an earlier run (`RematSummary.cost`, also in
  the plan's note): the option `cost_model` (`memcompile.Options`) chooses among the three.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import flop_registry

from memcompile.analysis.attention import ATTENTION_OPS
from memcompile.analysis.memory import _tensors, concrete, storage_key

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Attention kernels, priced here as two products of (Tq x D) by (D x Tk): torch's FLOP registry
# leaves the CPU kernel out, and one formula keeps the kernels' prices comparable.
_ATTENTION = set(ATTENTION_OPS)


@dataclass(frozen=True)
class CostModel:
    """Seconds per op, per byte moved and per FLOP."""

    seconds_per_op: float
    seconds_per_byte: float
    seconds_per_flop: float

    def node_seconds(self, node: fx.Node) -> float:
        """Estimated seconds to run `node` once (0 for placeholders and outputs)."""
        if node.op != "call_function":
            return 0.0
        return (self.seconds_per_op + self.seconds_per_byte * bytes_moved(node)
                + self.seconds_per_flop * flops(node))

    def to_dict(self) -> dict[str, float]:
        """The constants, as `Options(cost_model=...)` takes them to pin a later run."""
        return asdict(self)

    @classmethod
    def measured(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> CostModel:
        """Constants fitted to ops timed on `device` in `dtype`, their ratios rounded to a power
        of two (measured once per process, device kind and dtype)."""
        return _calibrate(torch.device(device).type, dtype)

    @classmethod
    def fixed(cls, device: str = "cpu") -> CostModel:
        """Representative constants of the device's kind (`FIXED`): nothing is timed."""
        kind = torch.device(device).type
        return FIXED["cpu" if kind == "cpu" else "cuda"]


FIXED = {
    "cpu": CostModel(seconds_per_op=4e-6, seconds_per_byte=2.5e-10, seconds_per_flop=3e-11),
    "cuda": CostModel(seconds_per_op=8e-6, seconds_per_byte=4e-13, seconds_per_flop=4e-15),
}
"""`cost_model="fixed"`: a CPU core pair's dispatch, bandwidth and matmul rate, and a data-center
GPU's (any device other than the CPU takes the GPU's)."""

COST_MODELS = ("measured", "fixed")
"""The named cost models of `Options.cost_model`; a dict of the three constants pins others."""


def cost_model(spec: str | Mapping[str, float], device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> CostModel:
    """The cost model `Options.cost_model` names, for a graph on `device` in `dtype`."""
    if spec == "measured":
        return CostModel.measured(device, dtype)
    if spec == "fixed":
        return CostModel.fixed(device)
    return CostModel(**spec)


def flops(node: fx.Node) -> int:
    """FLOPs of a matrix product, convolution or attention node; 0 for anything else."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0
    vals = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    try:
        if target in _ATTENTION:
            q, k = vals[0][0], vals[0][1]
            *batch, tq, d = (concrete(s) for s in q.shape)
            tk = concrete(k.shape[-2])
            return 4 * _prod(batch) * tq * tk * d
        formula = flop_registry.get(target.overloadpacket)
        if formula is None:
            return 0
        args, kwargs = vals
        return concrete(formula(*args, out_val=node.meta.get("val"), **kwargs))
    except Exception:  # a formula that cannot read these arguments: price the bytes only
        log.debug("no FLOP count for %s", node.name, exc_info=True)
        return 0


def bytes_moved(node: fx.Node) -> int:
    """Bytes an op reads and writes; a view (output aliasing an input) moves none."""
    inputs = [t for a in node.all_input_nodes for t in _tensors(a.meta.get("val"))]
    outputs = _tensors(node.meta.get("val"))
    input_storages = {storage_key(t) for t in inputs}
    if outputs and all(storage_key(t) in input_storages for t in outputs):
        return 0
    return sum(concrete(t.numel()) * t.element_size() for t in (*inputs, *outputs))


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


_ROUNDS = 7  # interleaved timing rounds; each op keeps its fastest


def _fastest(fns: list[tuple[Callable[[], Any], int]], dev: torch.device) -> list[float]:
    """Seconds per call of each `(fn, calls)`, timed in interleaved rounds of `calls` calls
    each, CUDA synchronized around each timing; each fn's fastest round (load only slows)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for fn, _ in fns:
        fn()  # warm up: allocator, kernels, caches
    best = [math.inf] * len(fns)
    for _ in range(_ROUNDS):
        for i, (fn, calls) in enumerate(fns):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


@functools.lru_cache(maxsize=None)
def _calibrate(device: str, dtype: torch.dtype) -> CostModel:
    """Time a tiny op (overhead), a large add (bandwidth) and a matmul (FLOP rate)."""
    # Planning runs inside AOTAutograd's FakeTensorMode: time real tensors, not fake ones.
    with unset_fake_temporarily(), _disable_current_modes():
        model = rounded(_time_ops(torch.device(device), dtype))
    log.info("cost model for %s %s: %.2e s/op, %.2e s/byte, %.2e s/FLOP (ratios rounded to "
             "powers of two; pin them with cost_model=%s)", device, dtype, model.seconds_per_op,
             model.seconds_per_byte, model.seconds_per_flop, model.to_dict())
    return model


def _time_ops(dev: torch.device, dtype: torch.dtype) -> CostModel:
    # A private generator: calibrating must not move the user's random stream.
    generator = torch.Generator(device=dev).manual_seed(0)
    tiny = torch.ones(1, device=dev, dtype=dtype)
    big = torch.ones(1 << 22, device=dev, dtype=dtype)
    n = 512
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=generator)
    overhead, add_seconds, mm_seconds = _fastest([
        (lambda: aten.add.Tensor(tiny, tiny), 64),
        (lambda: aten.add.Tensor(big, big), 2),
        (lambda: aten.mm.default(a, a), 2),
    ], dev)
    add_bytes = 3 * big.numel() * big.element_size()
    per_byte = max(add_seconds - overhead, 1e-3 * add_seconds) / add_bytes
    mm_bytes = 3 * n * n * a.element_size()
    per_flop = max(mm_seconds - overhead - per_byte * mm_bytes, 1e-3 * mm_seconds) / (2 * n ** 3)
    return CostModel(overhead, per_byte, per_flop)


def rounded(model: CostModel) -> CostModel:
    """`model` with seconds per op and per FLOP moved to the nearest power of two times its
    seconds per byte: the two ratios a plan depends on, so noise that leaves them within a
    factor of about 1.4 of the power of two leaves the plan as it is."""
    def snap(seconds: float) -> float:
        ratio = seconds / model.seconds_per_byte
        return model.seconds_per_byte * 2.0 ** round(math.log2(ratio))
    return CostModel(snap(model.seconds_per_op), model.seconds_per_byte,
                     snap(model.seconds_per_flop))


def transfer_bandwidth(device: str) -> float:
    """Host-device bytes per second on `device`, timed once per process: the slower direction
    of a 64 MiB copy between pinned host memory and the device (on the CPU, a 64 MiB copy
    between two buffers: `offload={"on_cpu": True}` moves values that way)."""
    return _bandwidth(torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _bandwidth(kind: str) -> float:
    nbytes = 1 << 26
    with unset_fake_temporarily(), _disable_current_modes():
        dev = torch.device(kind)
        if kind == "cuda":
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            on_device = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            seconds = _fastest([(lambda: on_device.copy_(host, non_blocking=True), 1),
                                (lambda: host.copy_(on_device, non_blocking=True), 1)], dev)
        else:
            a, b = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
            seconds = _fastest([(lambda: b.copy_(a), 1)], dev)
    bandwidth = nbytes / max(seconds)
    log.info("host-device bandwidth on %s: %.3g bytes/s (pin it with offload={'bandwidth': "
             "%.3g})", kind, bandwidth, bandwidth)
    return bandwidth
