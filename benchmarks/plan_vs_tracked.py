"""Planned peak against tracked peak, eager runtime, at each memory budget: equal to the byte?

Run: python benchmarks/plan_vs_tracked.py [--model small] [--seq-len 1024]
         [--budgets 1.0,0.9,0.8,0.7,auto,least]

For each budget the model is compiled with memcompile's eager runtime (FX graphs run in Python,
each tensor freed after its last use), one step runs to compile, and a second step is measured
at the dispatcher (`memcompile.measure.tracked_peak`). `least` is the least peak the planner
reaches, as bytes. Prints a markdown table; the planned peak comes from the planner's summary.
"""

from __future__ import annotations

import argparse
import platform

import torch

from memcompile.bench.worker import budget_error_of
from memcompile.measure import tracked_peak
from memcompile.models import build_model, make_batch
from memcompile.report import recording

MiB = 2**20


def one_budget(preset: str, seq_len: int, budget) -> tuple[int, int]:
    """(planned peak, tracked peak) for one budget."""
    torch._dynamo.reset()
    model = build_model(preset)
    batch = make_batch(preset, seq_len=seq_len)
    compiled = torch.compile(model, backend="memcompile",
                             options={"runtime": "eager", "memory_budget": budget})

    def step() -> None:
        compiled(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    with recording() as records:
        step()
    (record,) = [r for r in records if r.kind == "training"]
    return record.plan.chosen_peak, tracked_peak(step)


def least_peak(preset: str, seq_len: int) -> int:
    """The least peak the planner reaches: what a budget of one byte is refused with."""
    try:
        one_budget(preset, seq_len, "1B")  # an int below 1 MiB is refused (1 against 1.0)
    except Exception as error:
        budget_error = budget_error_of(error)
        if budget_error is None:
            raise
        return budget_error.least_peak_bytes
    raise AssertionError("a budget of one byte was met")


def parse_budget(text: str):
    """A budget as the options take it: a float, or "auto"; "least" stays a name."""
    return text if text in ("auto", "least") else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--budgets", default="1.0,0.9,0.8,0.7,auto,least")
    args = parser.parse_args()
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    print(f"`python benchmarks/plan_vs_tracked.py --model {args.model} --seq-len {args.seq_len} "
          f"--budgets {args.budgets}` (torch {torch.__version__}, {platform.machine()})\n")
    print("| budget | planned bytes | tracked bytes | tracked - planned | planned MiB |")
    print("|---|---|---|---|---|")
    for budget in budgets:
        if budget == "least":
            budget = least_peak(args.model, args.seq_len)
        try:
            planned, tracked = one_budget(args.model, args.seq_len, budget)
        except Exception as error:
            if budget_error_of(error) is None:
                raise
            print(f"| {budget!r} | — | — | — | below the least peak |")
            continue
        print(f"| {budget!r} | {planned:,} | {tracked:,} | {tracked - planned:+,} | "
              f"{planned / MiB:.1f} |", flush=True)


if __name__ == "__main__":
    main()
