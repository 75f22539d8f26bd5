"""Offload to host against the recompute-only remat plan (issue 18, point 5): one training step of
the built-in `wide` model in bfloat16 on CUDA.

    python benchmarks/offload_cuda.py --seq-len 8192 [--budget auto] [--runtime eager]

Modes, each in its own process (no allocator state or compiled code shared):

- `recompute`: the remat plan for `--budget` (`offload=False`).
- `offload`: the same budget with `offload=True`: the same remat plan (the same recompute),
  then the saved values whose two transfers fit under the compute between their producer and
  their first backward reader (measured host-device bandwidth) go to pinned host memory.

The target: `offload` peaks lower than `recompute` at the same step time. Each mode prints one
JSON line: the CUDA allocator's peak above the step's start (`memcompile.measure`, method
"cuda"), the median step seconds over `--repeat` steps, the planned peak, and what was
offloaded (values, bytes) at which bandwidth. Needs a CUDA device; it says so and stops
without one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODES = ("recompute", "offload")


def worker(mode: str, seq_len: int, budget: object, runtime: str, repeat: int) -> dict:
    import torch

    import memcompile
    from memcompile.models import build_model, make_batch
    from memcompile.report import recording

    model = build_model("wide", dtype=torch.bfloat16).cuda()
    batch = {k: v.cuda() for k, v in make_batch("wide", batch_size=1, seq_len=seq_len).items()}
    options = {"memory_budget": budget, "runtime": runtime, "stream": False,
               "offload": mode == "offload"}
    loss = torch.compile(lambda b: model(**b).loss, backend="memcompile", options=options)

    def step() -> None:
        loss(batch).backward()
        model.zero_grad(set_to_none=True)

    with recording() as records:
        step()
    (record,) = [r for r in records if r.kind == "training"]
    measured = memcompile.measure(step, warmup=1, repeat=repeat, method="cuda")
    offloaded = record.decisions_of("offloaded")
    notes = [text for name, text in record.notes if name == "offload"]
    return {"mode": mode, "seq_len": seq_len, "budget": budget, "runtime": runtime,
            "peak_mib": round(measured.peak_bytes / 2**20, 1),
            "step_s": round(measured.seconds, 4),
            "planned_peak_mib": round(record.plan.chosen_peak / 2**20, 1),
            "offloaded_values": len(offloaded),
            "offloaded_mib": round(sum(d.bytes for d in offloaded) / 2**20, 1),
            "offload_note": notes[0] if notes else None,
            "unmet": [reason for _, reason in record.unmet]}


def _budget(text: str) -> object:
    if text in ("auto", "None"):
        return None if text == "None" else text
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text  # a byte string such as "2GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--budget", default="auto", help='"auto", "None", a fraction or bytes')
    parser.add_argument("--runtime", default="eager", choices=("eager", "inductor"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("offload_cuda.py needs a CUDA device: offload moves values between a GPU and "
              "pinned host memory, and a CPU has no separate host memory to measure",
              file=sys.stderr)
        return 2
    budget = _budget(args.budget)
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_len, budget, args.runtime, args.repeat)))
        return 0
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        done = subprocess.run(
            [sys.executable, __file__, "--worker", mode, "--seq-len", str(args.seq_len),
             "--budget", args.budget, "--runtime", args.runtime, "--repeat", str(args.repeat)],
            capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        print(lines[-1] if done.returncode == 0 and lines else json.dumps(
            {"mode": mode, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
