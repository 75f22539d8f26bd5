"""The `memcompile` torch.compile backend: validate options, capture, rewrite, run.

torch.compile hands the backend a Dynamo graph and, at the first call of the compiled function,
the user's `options`. The backend validates them, then `capture.compile_graph` takes the graph
through AOTAutograd's joint graph, memcompile's passes and the partition to the runtime. Under
`sequence_parallel`, `capture_parallel.compile_sequence_parallel` takes it: the "capture"
pipeline first (the `sequence_parallel` pass), then the same path, or with `stream=True` the
stream path on each rank's shard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch._dynamo
import torch.distributed as dist
import torch.fx as fx

from memcompile.config import Options
from memcompile.errors import OptionsError
from memcompile.per_size import CompiledPerSize, is_symbolic


def trace_checkpointed_layers() -> None:
    """Let Dynamo trace a checkpointed layer whose forward has a Python side effect.

    Hugging Face's `gradient_checkpointing_enable()` (the Trainer's `gradient_checkpointing=
    True`) wraps each layer in `torch.utils.checkpoint`, and its layers set a context variable
    (the `kernels` package's). By default Dynamo refuses side effects under checkpoint and
    breaks the graph at every layer, so no graph holds a layer and nothing can stream or be
    planned. Dynamo's option `skip_fwd_side_effects_in_bwd_under_checkpoint` traces the layer and
    runs the side effect once, in the forward. Replaying it in the backward is what eager
    checkpointing does, and what no compiled backward does: the recompute is memcompile's, on
    the traced ops. Set when memcompile is imported, for every graph Dynamo traces from then on.
    """
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


trace_checkpointed_layers()


_SP_PASSES = (("sequence_parallel", "capture"), ("sequence_parallel_grads", "joint"))
"""The passes `sequence_parallel` cannot run without, and their graphs."""


def check_available(options: Options) -> None:
    """Refuse, with a clear error before capture, options this process cannot honour:
    `sequence_parallel` without torch.distributed initialized, or without its passes."""
    if options.sequence_parallel is False:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise OptionsError("sequence_parallel", "needs torch.distributed initialized: launch "
                           "with torchrun (torchrun --nproc-per-node 2 train.py) and call "
                           "torch.distributed.init_process_group() before the first step")
    from memcompile.passes.registry import active_options, resolve_pipeline

    for name, graph in _SP_PASSES:
        if name not in resolve_pipeline(options.passes, options.disable_passes,
                                        options.runtime, graph, active_options(options)):
            key = "disable_passes" if name in options.disable_passes else "passes"
            raise OptionsError(key, f"sequence_parallel needs the pass {name!r}: without it "
                               "each rank would compute a wrong step; keep it in the pipeline")


def memcompile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | Options | None = None,
) -> Callable[..., Any]:
    """The torch.compile backend: `torch.compile(model, backend="memcompile", options={...})`."""
    from memcompile.capture import compile_graph
    from memcompile.capture_parallel import compile_sequence_parallel
    from memcompile.capture_stream import compile_stream

    # Dynamo wraps what a backend raises as "backend='memcompile' raised: OptionsError: ...",
    # the last line of the traceback: the message names the key and what is valid.
    opts = Options.from_mapping(options)
    check_available(opts)
    if opts.sequence_parallel:
        return compile_sequence_parallel(gm, example_inputs, opts)
    if opts.stream is True or not isinstance(opts.stream, (bool, str)):
        return compile_stream(gm, example_inputs, opts)
    if opts.stream == "auto" and opts.memory_budget == "auto":
        return compile_stream(gm, example_inputs, opts, auto=True)
    if isinstance(opts.memory_budget, int) and is_symbolic(example_inputs):
        # A byte budget holds at every length: planned again at each length the graph runs at.
        return CompiledPerSize(gm, opts, memcompile)
    return compile_graph(gm, example_inputs, opts)

