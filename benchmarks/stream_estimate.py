"""StreamBP's estimated peak for a model at lengths too long to run here, per layer inputs held.

The stream plan's estimate (`memcompile.planning.stream_memory`) bounds the measured peak from
above (tests/test_stream.py; the bench rows beside it in BENCHMARKS.md). It is linear in the
length, so two traced lengths give its line; where that line crosses a limit is a length the
plan is guaranteed to fit under that limit by its own accounting. Nothing runs but tracing
with fake tensors: no step is computed.

    python benchmarks/stream_estimate.py --model wide --lengths 4096,8192 --limit-gib 2
"""

from __future__ import annotations

import argparse

import torch

from memcompile.capture_stream import stream_forward
from memcompile.config import Options
from memcompile.meta import STREAM_PLAN
from memcompile.models import build_model, make_batch
from memcompile.planning.stream_memory import estimate
from memcompile.planning.stream_schedule import least_checkpoints, reversal


class _Planned(Exception):
    pass


def plan_terms(model_name: str, length: int, options: dict, dtype: torch.dtype = torch.float32):
    """The stream plan's estimate terms for one step of `model_name` at `length` tokens."""
    model = build_model(model_name, dtype=dtype)
    batch = make_batch(model.config, seq_len=length)
    found = {}

    def backend(gm, example_inputs):
        forward, _ = stream_forward(gm, example_inputs, Options(stream=options), "estimate")
        plan = forward.meta[STREAM_PLAN]
        found["memory"] = estimate(plan, [x for x in example_inputs
                                          if isinstance(x, torch.Tensor) and x.requires_grad])
        raise _Planned

    torch._dynamo.reset()
    try:
        torch.compile(lambda b: model(**b).loss, backend=backend)(batch)
    except Exception as e:  # Dynamo wraps what a backend raises
        if not isinstance(getattr(e, "inner_exception", e), _Planned):
            raise
    return found["memory"]


def main() -> None:
    """Print, per number of held layer inputs, the estimate at each length and where its line
    crosses the limit (above weights and gradients)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide")
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--limit-gib", type=float, default=2.0)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()
    lengths = [int(t) for t in args.lengths.split(",")]
    options = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    memories = [plan_terms(args.model, t, options, getattr(torch, args.dtype)) for t in lengths]
    n = memories[0].layers
    limit = args.limit_gib * 2**30
    dtype = f" --dtype {args.dtype}" if args.dtype != "float32" else ""
    print(f"`python benchmarks/stream_estimate.py --model {args.model} --lengths "
          f"{args.lengths} --limit-gib {args.limit_gib:g}{dtype}`\n")
    print("| layer inputs held | recomputed layer forwards | "
          + " | ".join(f"estimate MiB above weights+grads @{t}" for t in lengths)
          + " | KiB/token | longest under "
          f"{args.limit_gib:g} GiB (estimate) |")
    print("|---|---|" + "---|" * len(lengths) + "---|---|")
    for c in range(least_checkpoints(n), n + 1):
        above = [m.peak(c) - m.gradients for m in memories]
        slope = (above[-1] - above[0]) / (lengths[-1] - lengths[0])
        longest = lengths[0] + (limit - above[0]) / slope
        print(f"| {c} | {reversal(n, c).recomputed()} | "
              + " | ".join(f"{a / 2**20:,.1f}" for a in above)
              + f" | {slope / 1024:.1f} | {longest / 1000:.1f}k |")


if __name__ == "__main__":
    main()
