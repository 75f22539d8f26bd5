"""The `memcompile` command: `demo`, `explain` and `bench` on the built-in models.

Nothing is downloaded: the models are built from configs with random weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import memcompile
from memcompile.bench.args import DTYPES as BENCH_DTYPES
from memcompile.bench.args import argtype, parse_options, positive_int
from memcompile.bench.launch import add_bench_parser
from memcompile.models import PRESETS, build_model, make_batch

DTYPES = {name: getattr(torch, name) for name in BENCH_DTYPES}


def _add_model_arguments(p: argparse.ArgumentParser, *, model: str, seq_len: int) -> None:
    p.add_argument("--model", choices=sorted(PRESETS), default=model,
                   help=f"built-in preset (default {model})")
    p.add_argument("--seq-len", type=argtype(positive_int), default=seq_len,
                   help="tokens per sequence")
    p.add_argument("--batch-size", type=argtype(positive_int), default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--options", type=argtype(parse_options), default={},
                   help='memcompile options as JSON, e.g. \'{"runtime": "eager"}\'')


def _describe(args: argparse.Namespace) -> str:
    c = PRESETS[args.model]
    return (f"built-in {args.model!r} model ({c.num_layers} layers, hidden {c.hidden_size}, "
            f"vocabulary {c.vocab_size}), {args.batch_size} x {args.seq_len} tokens, {args.dtype}")


def _max_grad_difference(model: torch.nn.Module, ref: torch.nn.Module) -> float:
    """Worst relative gradient difference over the parameters (the exactness measure of
    docs/design.md, "Exactness, defined")."""
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        worst = max(worst, ((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item())
    return worst


def run_demo(args: argparse.Namespace) -> int:
    """Train the built-in model with and without memcompile; print memory, time and exactness."""
    dtype = DTYPES[args.dtype]
    options = {"runtime": "inductor", **args.options}
    print(f"memcompile demo: {_describe(args)}, options {options}")
    eager = build_model(args.model, dtype=dtype, seed=0)
    model = build_model(args.model, dtype=dtype, seed=0)
    compiled = torch.compile(model, backend="memcompile", options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print(f"{'step':>4}  {'loss eager':>12}  {'loss memcompile':>16}  {'max grad rel. diff':>18}")
    worst = 0.0
    for step in range(args.steps):
        batch = make_batch(args.model, batch_size=args.batch_size, seq_len=args.seq_len,
                           seed=step)
        # Compare gradients at the same weights: AdamW would otherwise amplify float32
        # rounding differences of earlier steps into the weights themselves.
        eager.load_state_dict(model.state_dict())
        losses = []
        for m in (eager, compiled):
            loss = m(**batch).loss
            loss.backward()
            losses.append(loss.item())
        diff = _max_grad_difference(model, eager)
        worst = max(worst, diff)
        print(f"{step + 1:>4}  {losses[0]:>12.6f}  {losses[1]:>16.6f}  {diff:>18.2e}")
        opt.step()
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
    batch = make_batch(args.model, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    print(f"\n{'':<12}{'peak above weights':>20}{'step time':>12}   (measure: CPU allocator)")
    for name, m, owner in (("eager", eager, eager), ("memcompile", compiled, model)):
        def train_step(m: Any = m, owner: torch.nn.Module = owner) -> None:
            m(**batch).loss.backward()
            owner.zero_grad(set_to_none=True)

        r = memcompile.measure(train_step, warmup=1, repeat=3)
        print(f"{name:<12}{r.peak_bytes / 2**20:>16,.1f} MiB{r.seconds:>10.3f} s")
    print(f"\nlargest gradient difference over {args.steps} steps: {worst:.2e} "
          "(relative, worst parameter)")
    _write_report(args, options, model, batch)
    return 0


def _write_report(args: argparse.Namespace, options: dict[str, Any], model: Any,
                  batch: dict[str, torch.Tensor]) -> None:
    os.makedirs(args.out, exist_ok=True)
    report = memcompile.explain(model, options=options, example_kwargs=batch)
    text_path = os.path.join(args.out, "report.txt")
    with open(text_path, "w") as f:
        f.write(str(report) + "\n")
    plot_path = report.plot(os.path.join(args.out, "memory.png"))
    print(f"report: {text_path}\nmemory timeline: {plot_path}")


def run_explain(args: argparse.Namespace) -> int:
    """Print the report of one training step of a built-in model."""
    model = build_model(args.model, dtype=DTYPES[args.dtype], seed=0)
    batch = make_batch(args.model, batch_size=args.batch_size, seq_len=args.seq_len)
    report = memcompile.explain(model, options=args.options, example_kwargs=batch)
    print(f"# {_describe(args)}")
    print(report)
    if args.plot:
        print(f"memory timeline: {report.plot(args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `memcompile` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="memcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a built-in model with and without memcompile")
    _add_model_arguments(demo, model="small", seq_len=1024)
    demo.add_argument("--steps", type=argtype(positive_int), default=3)
    demo.add_argument("--out", default="memcompile-demo", help="folder for the report and plot")
    demo.set_defaults(func=run_demo)
    explain = sub.add_parser("explain", help="print the memory report of a built-in model")
    _add_model_arguments(explain, model="tiny", seq_len=64)
    explain.add_argument("--plot", default=None, help="also write the memory timeline PNG here")
    explain.set_defaults(func=run_explain)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memcompile` command."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    code = args.func(args)
    print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
