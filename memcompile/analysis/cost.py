"""What recomputing an op costs: seconds from its FLOPs and the bytes it moves.

`CostModel(seconds_per_op, seconds_per_byte, seconds_per_flop)` prices one op run by the eager
runtime as a fixed dispatch overhead, plus the bytes it reads and writes at memory bandwidth, plus
its FLOPs (matrix products, convolutions, attention: torch's own FLOP formulas) at the matmul
rate. `CostModel.measured(device)` fits the three constants to ops timed on the device, once per
process; tests pass constants of their own, so plans do not depend on the machine.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from dataclasses import dataclass

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

    @classmethod
    def measured(cls, device: str = "cpu") -> CostModel:
        """Constants fitted to ops timed on `device` (measured once per process)."""
        return _calibrate(torch.device(device).type)


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


def _median_seconds(fn, repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _calibrate(device: str) -> CostModel:
    """Time a tiny op (overhead), a large add (bandwidth) and a matmul (FLOP rate)."""
    # Planning runs inside AOTAutograd's FakeTensorMode: time real tensors, not fake ones.
    with unset_fake_temporarily(), _disable_current_modes():
        return _time_ops(torch.device(device))


def _time_ops(dev: torch.device) -> CostModel:
    tiny = torch.ones(1, device=dev)
    overhead = _median_seconds(lambda: aten.add.Tensor(tiny, tiny), repeat=51)
    big = torch.ones(1 << 22, device=dev)
    add_bytes = 3 * big.numel() * big.element_size()
    per_byte = max(_median_seconds(lambda: aten.add.Tensor(big, big)) - overhead, 0.0) / add_bytes
    n = 512
    a = torch.randn(n, n, device=dev)
    mm_seconds = _median_seconds(lambda: aten.mm.default(a, a))
    mm_bytes = 3 * n * n * a.element_size()
    per_flop = max(mm_seconds - overhead - per_byte * mm_bytes, 1e-15) / (2 * n ** 3)
    model = CostModel(overhead, per_byte, per_flop)
    log.info("cost model for %s: %.2e s/op, %.2e s/byte, %.2e s/FLOP", dev, *(
        model.seconds_per_op, model.seconds_per_byte, model.seconds_per_flop))
    return model
