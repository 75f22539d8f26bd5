"""`memcompile.measure`: the peak memory and time of a function, measured the same way for all.

Three measures, each named in `Measurement.method`:

- "cuda": the CUDA allocator's peak (`torch.cuda.max_memory_allocated`) above what was allocated
  when `fn` started.
- "allocator": the CPU allocator, seen through `torch.profiler` with `profile_memory=True`: the
  running sum of its `[memory]` events (allocations +, frees -), in time order; its maximum is
  the peak above what was live at the start. It sees every storage, Inductor's own buffers
  included, and does not change what Dynamo compiles.
- "tracked": live tensor bytes seen at the dispatcher: the storages that ops return (views and
  in-place results excluded, by the op's schema, and the host copies `memcompile::offload`
  returns: device memory only), until they are freed. The memory simulator
  equals it to the byte in the eager runtime. Its dispatch mode declares
  `ignore_compile_internals`, so Dynamo still compiles under it (torch 2.13 otherwise skips the
  frame, and keeps skipping it afterwards).

`baseline_bytes` is what is live when `fn` starts: the CUDA allocator's count on GPU, else the
bytes of distinct CPU storages reachable from Python objects.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

METHODS = ("auto", "allocator", "tracked", "cuda")


@dataclass(frozen=True)
class Measurement:
    """Peak bytes above the baseline while `fn` ran, the baseline, median seconds, the measure."""

    peak_bytes: int
    baseline_bytes: int
    seconds: float
    method: str


def _is_tensor(obj: object) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a weakref proxy whose referent is gone
        return False


def live_cpu_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages behind every tensor Python can reach now."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        # isinstance() on some deprecated torch objects found by gc warns; they are not tensors.
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if _is_tensor(o)]
    for t in tensors:
        # Dynamo and AOTAutograd keep FakeTensors in their caches: they claim a CPU device but
        # own no memory.
        if t.device.type != "cpu" or t.is_meta or isinstance(t, FakeTensor):
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue  # sparse, fake or other tensors without a plain storage
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


HOST_OUTPUT_OPS = ("memcompile::offload",)
"""Ops whose outputs live in host memory (`runtime.offload`): the tracked measure counts the
device's bytes, as the CUDA measure does, so it leaves them out."""


class TrackedLiveBytes(TorchDispatchMode):
    """Counts bytes of storages returned by ops while they stay alive; keeps the peak."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Off while Dynamo and AOTAutograd trace, on while compiled code runs.
        return True

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    # Higher-order operators (the RNG-state wrappers of checkpointed regions, among others)
    # reach __torch_dispatch__ too; they have no schema, so every new output storage counts.
    supports_higher_order_operators = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Some views carry no alias annotation (`_unsafe_view`): check the storages too.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        if isinstance(func, torch._ops.HigherOrderOperator):
            fresh = [out]
        elif func._schema.name in HOST_OUTPUT_OPS:
            fresh = []  # host memory, not the device's
        else:
            returns = func._schema.returns
            results = out if isinstance(out, (tuple, list)) and len(returns) > 1 else [out]
            # A view or an in-place result (an alias annotation) is no new storage.
            fresh = [r for spec, r in zip(returns, results) if spec.alias_info is None]
        for t in tree_leaves(fresh):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._tracked:
            return
        nbytes = storage.nbytes()
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side prints a line at each start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocator_peak(fn: Callable[[], Any]) -> int:
    """Peak CPU allocator bytes above the start while `fn` runs (profiler `[memory]` events).

    The profiler remembers the size of every block allocated while any profiling session was
    on, so a block an earlier `allocator_peak` call allocated and `fn` frees (the previous
    step's `.grad`, dropped by `zero_grad()`) counts as freed here, lowering the peak, while a
    block allocated outside profiling and freed in it does not count. Measure a step's first
    profiled call after an unprofiled warm-up (as the bench does), or use `tracked_peak`.
    """
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    )
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    # The raw allocator events: FunctionEvent lists fold most of them into the ops they ran in.
    events = sorted(
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def tracked_peak(fn: Callable[[], Any]) -> int:
    """Peak live tensor bytes above the start while `fn` runs, seen at the dispatcher."""
    mode = TrackedLiveBytes()
    with mode:
        fn()
    return mode.peak


def cuda_peak(fn: Callable[[], Any]) -> int:
    """Peak CUDA allocator bytes above the start while `fn` runs."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


_PEAK_FNS = {"allocator": allocator_peak, "tracked": tracked_peak, "cuda": cuda_peak}


def measure(
    fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3, method: str = "auto"
) -> Measurement:
    """Measure `fn`'s peak memory above what is live when it starts, and its median time.

    Runs `fn` `warmup` times (compilation happens there), once under the memory measure, then
    `repeat` times unobserved for the time. `method`: "auto" (CUDA when available, else the
    CPU allocator), "allocator", "tracked" or "cuda".
    """
    if method not in METHODS:
        raise ValueError(f"unknown measure method {method!r}; valid: {', '.join(METHODS)}")
    if method == "auto":
        method = "cuda" if torch.cuda.is_available() else "allocator"
    if method == "cuda" and not torch.cuda.is_available():
        raise ValueError("method 'cuda' needs a CUDA device and none is available; valid here: "
                         "auto, allocator, tracked")
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    for _ in range(warmup):
        fn()
    gc.collect()
    baseline = torch.cuda.memory_allocated() if method == "cuda" else live_cpu_tensor_bytes()
    peak = _PEAK_FNS[method](fn)
    times = [wall_seconds(fn, cuda=method == "cuda") for _ in range(repeat)]
    return Measurement(peak, baseline, statistics.median(times), method)


def wall_seconds(fn: Callable[[], Any], *, cuda: bool = False) -> float:
    """Seconds one call of `fn` takes; with `cuda`, until the device has finished its work."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: unchanged), restored on exit, so a
    benchmark row can pin them inside a caller's process."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

