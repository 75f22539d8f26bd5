"""The ops that move a saved value to host memory after its producer and back before its first
backward reader (`planning.offload` decides which; `planning.remat_split` puts them in the
graphs).

- `memcompile::offload(x)`: a host copy of `x`. On CUDA the copy goes into pinned memory on a
  side stream, after the compute stream's work so far, with `non_blocking=True`: the compute
  stream never waits for it. `x.record_stream(side)` keeps the caching allocator from handing
  `x`'s block to another tensor before the copy has read it, so the graph may drop `x` at once.
- `memcompile::fetch(host, device)`: the device copy of `host`, made on the same side stream
  (so after the offload's copy), after the compute stream's work so far (the new block may
  still be read by earlier kernels); the compute stream then waits for it, so whatever runs
  after the fetch reads the value complete. The fetch thus overlaps with the work the GPU has
  queued, not with work issued after it.
- On the CPU (`offload={"on_cpu": True}`, for tests) both are plain copies into a new buffer.

Both are opaque custom ops: the eager runtime calls them in graph order and Inductor runs them
as extern kernels in order with their readers (they take and return tensors).

Memory is counted as the device's: the value returned by `offload` is host memory, which the
memory simulator (`analysis.memory.HOST_VALUE`) and the tracked measure (`memcompile.measure`)
do not count.
"""

from __future__ import annotations

import torch

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of `device` that every transfer runs on, in issue order."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


@torch.library.custom_op("memcompile::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """A host copy of the contiguous tensor `x` (pinned, copied on a side stream, on CUDA)."""
    if x.device.type != "cuda":
        return x.clone()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    side = _side(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        host.copy_(x, non_blocking=True)
    x.record_stream(side)
    return host


@offload.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("memcompile::fetch", mutates_args=())
def fetch(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The copy of the host tensor `host` on `device` (through the side stream, on CUDA)."""
    if device.type != "cuda":
        return host.clone()
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    side, current = _side(out.device), torch.cuda.current_stream(out.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out.copy_(host, non_blocking=True)
    current.wait_stream(side)
    return out


@fetch.register_fake
def _(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty(host.shape, dtype=host.dtype, device=device)


OFFLOAD = torch.ops.memcompile.offload.default
"""The op that copies a value to the host (a node's target)."""
FETCH = torch.ops.memcompile.fetch.default
"""The op that copies it back (a node's target)."""
