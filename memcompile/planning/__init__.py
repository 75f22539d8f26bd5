"""Planners that passes and the runtime share, below both of them.

- `remat`: the rematerialization planner (`plan_remat` runs it) and `remat_split`, which applies
  its tags when the joint graph is split into forward and backward.
- `stream_schedule`: which layer inputs a streamed run of layers holds and when the backward
  rebuilds the others (the revolve reversal); the stream runtime executes it.
- `stream_memory`: the stream plan's estimate of a step's peak, and the layer inputs a budget
  allows.

Nothing here imports `memcompile.passes` or `memcompile.runtime`.
"""
