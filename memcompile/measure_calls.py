"""`memcompile.measure_calls`: how many calls a function makes, counted by `torch.profiler`.

A step bound by launches rather than by arithmetic shows it in its call count, on any machine:
time on a shared CPU is noisy, a count is not. `count_calls(fn)` runs `fn` once under the
profiler and counts, among `prof.events()` (every thread, so the autograd engine's too):

- `aten`: the events whose name starts `aten::`, at every level of nesting (`aten::linear`
  and the `aten::mm` it calls are two). The dispatcher records one per operator call it runs.
- `kernels`: Inductor's generated CPU kernels (`cpp_fused_...`, named `graph_<i>_<name>` by
  the record Inductor writes into each kernel when `torch._inductor.config.cpp.
  enable_kernel_profile` was on at compile time: `kernel_profile()` turns it on); on CUDA,
  kernel launches (the runtime's `cudaLaunchKernel` events and their kin), which is what a
  launch-bound step pays for per call.

`CallCount.calls` is the figure a bench reports: on the CPU aten events plus generated kernels
(an Inductor kernel replaces aten calls, so a fused step has fewer of the first and a few of
the second), on CUDA the kernel launches.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from memcompile.measure import _quiet_stderr

_INDUCTOR_CPU_KERNEL = re.compile(r"^(graph_\d+_)?cpp_")
"""Inductor's CPU kernels are named `cpp_<...>` (`cpp_fused_mul_0`, templates `cpp_<...>`);
the record in the kernel prefixes the graph's id."""

_CUDA_LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                            "cuLaunchKernelEx", "cudaLaunchCooperativeKernel"})
"""CUDA runtime and driver calls that launch one kernel each."""


@dataclass(frozen=True)
class CallCount:
    """Calls one run of a function made, by kind, and the most frequent names."""

    aten: int
    """`aten::` operator events, nested ones included."""
    kernels: int
    """Inductor's generated CPU kernels (CPU) or kernel launches (CUDA)."""
    device: str
    """"cpu" or "cuda": what `kernels` counts."""
    names: dict[str, int] = field(default_factory=dict, compare=False)
    """Every counted name (aten operators, kernels, launch calls) and its count."""

    @property
    def calls(self) -> int:
        """The calls per step a bench reports: aten events plus generated kernels on the CPU,
        kernel launches on CUDA."""
        return self.kernels if self.device == "cuda" else self.aten + self.kernels

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        """The `n` most frequent names, most frequent first (ties by name)."""
        return sorted(self.names.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def count_calls(fn: Callable[[], Any], *, device: str | None = None) -> CallCount:
    """Run `fn` once under `torch.profiler` and count its aten operator events and its kernels
    (module docstring). `device`: "cpu" or "cuda"; None: "cuda" when available. On CUDA the
    device is synchronized before and after, so every launch of `fn` falls inside."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"count_calls counts on 'cpu' or 'cuda', not {device!r}")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    prof = torch.profiler.profile(activities=activities)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        with _quiet_stderr():
            prof.stop()
    return tally([e.name for e in prof.events()], device)


def tally(names: list[str], device: str) -> CallCount:
    """A `CallCount` from the profiler's event names (what `count_calls` reads)."""
    counted: collections.Counter[str] = collections.Counter()
    aten = kernels = 0
    for name in names:
        if name.startswith("aten::"):
            aten += 1
        elif device == "cpu" and _INDUCTOR_CPU_KERNEL.match(name):
            kernels += 1
        elif device == "cuda" and name in _CUDA_LAUNCHES:
            kernels += 1
        else:
            continue
        counted[name] += 1
    return CallCount(aten, kernels, device, dict(counted))


@contextlib.contextmanager
def kernel_profile() -> Iterator[None]:
    """Inductor's CPU kernels record themselves to the profiler while compiled inside this
    context (`torch._inductor.config.cpp.enable_kernel_profile`); code compiled before, or
    outside, stays invisible to `count_calls`. The record costs a thread-local check per
    kernel call when no profiler runs."""
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        yield
