"""`memcompile bench`: peak memory and step time of one training step, side by side with the peers.

    memcompile bench --model small --seq-lens 512,1024,2048 \\
        --modes eager,checkpoint,inductor,budget_0.5,budget_0.0,memcompile \\
        --options '{"runtime": "inductor"}' --out bench_out

Every (mode, sequence length) runs in a fresh Python process (`python -m memcompile.bench
--worker SPEC`), so no configuration inherits another's compiled code, allocator caches or
Dynamo state, and an out-of-memory kill or a crash costs one row, not the whole bench. Each
worker builds the model with a fixed seed, runs one warm-up step (timed alone: that is where
compilation happens), then `memcompile.measure`: the CPU allocator's peak through
`torch.profiler` (or the CUDA allocator's on a GPU) above what is live when the step starts, and
the median time of `--repeat` unprofiled steps. One step is forward, `.loss`, `.backward()`, then
`zero_grad(set_to_none=True)`, so every step starts from the same state: weights live, no
gradients.

Modes:

- `eager`: the plain module.
- `checkpoint`: eager with per-layer activation checkpointing (non-reentrant).
- `inductor`: `torch.compile(model)` with its defaults.
- `budget_<f>`: `torch.compile(model)` with `torch._functorch.config.activation_memory_budget = f`
  for the whole run (`budget_0.5`, `budget_0.0`, any float in [0, 1]).
- `memcompile`: `torch.compile(model, backend="memcompile", options=<--options>)`.
- `stream`: StreamBP, `torch.compile(lambda **b: model(**b).loss, backend="memcompile",
  options={"stream": True, ...})` (the loss alone is compiled, so the logits need not exist
  whole; `--options` may carry a `stream` dict with chunk sizes).
- `stream_g<g>`: StreamBP saving every `g`-th layer's input (`layers_per_checkpoint` g).
- `stream_c<c>`: StreamBP holding at most `c` layer inputs at once (`checkpoints` c), the others
  recomputed in the backward with the fewest layer forwards: what a numeric `memory_budget`
  picks under stream.
- `stream_keep`, `stream_c<c>_keep`, `stream_g<g>_keep`: the same with `keep_attention` (held
  layers keep attention's outputs; the backward skips attention's forward).
- `mcbudget_<x>`: memcompile with `memory_budget` = x set over `--options`: a float in (0, 1]
  (a fraction of the save-everything plan's peak), bytes with a unit (`mcbudget_280MiB`: ask
  for the peak another mode reached), `auto` or `none` (`mcbudget_0.5`, `mcbudget_auto`). A
  budget below the least peak memcompile's planner reaches is a row with status "budget
  unreachable" and that least peak, not a crash.

Outputs in `--out`: `results.json` (every row and the command), `bench.md` (the table, also
printed) and `bench.png` (peak and step time against tokens). With more than one budget mode
(`budget_*`, `mcbudget_*`), also the plane: per length, a table of every mode sorted by peak
with its step time and time against `checkpoint` (in `bench.md`, also printed), and
`plane.png`, step time against peak.

Modules: `args` (the command line's values), `worker` (one configuration, in its own process),
`launch` (the `bench` subparser, the driver and the command's entry), `results` (slope, table, markdown, plot).
"""

from __future__ import annotations

from memcompile.bench.args import (
    DEFAULT_MODES,
    budget_of,
    format_command,
    is_budget_mode,
    mc_budget_options,
    parse_model,
    parse_modes,
    parse_options,
    parse_seq_lens,
)
from memcompile.bench.launch import (_last_json_line, add_bench_parser, main, run_bench_command,
                                     run_config)
from memcompile.bench.results import (
    fit_slope,
    has_plane,
    plane_points,
    plot_plane,
    render_markdown,
    render_plane_table,
    render_table,
)
from memcompile.bench.worker import worker_main

__all__ = [
    "DEFAULT_MODES",
    "_last_json_line",  # private, read by the tests
    "add_bench_parser",
    "budget_of",
    "fit_slope",
    "format_command",
    "has_plane",
    "is_budget_mode",
    "main",
    "mc_budget_options",
    "parse_model",
    "parse_modes",
    "parse_options",
    "parse_seq_lens",
    "plane_points",
    "plot_plane",
    "render_markdown",
    "render_plane_table",
    "render_table",
    "run_bench_command",
    "run_config",
    "worker_main",
]
