"""Where a training step's time goes: operator self time and matrix-product arithmetic of one
step of the built-in `wide` model, float32, on the CPU, per mode of `chunk_bodies.py`.

    python benchmarks/step_profile.py --seq-len 8192 --modes checkpoint,compiled,compiled:4096

Each mode runs in its own process: one step to compile and warm up, one timed step, then one
step under `torch.profiler` (CPU activities, input shapes recorded). Each prints one JSON line:

- `step_s`: the timed step's wall seconds (without the profiler);
- `self_s`: the profiled step's operator self time, summed over every event, and `top`: the
  operators with the most of it (seconds, calls);
- `mm_gflop`, `mm_s`: the floating-point operations of every `aten::mm` (2 m k n each, from the
  recorded shapes) and their self time: whether a mode computes more, or computes it slower
  (smaller products), shows apart from the machine's speed.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from chunk_bodies import _step_fn, check_modes, run_worker


def worker(mode: str, seq_len: int, top: int) -> dict:
    import torch

    from memcompile.measure_calls import kernel_profile

    with kernel_profile():  # Inductor's kernels record themselves, so they show by name
        step = _step_fn(mode, seq_len)
        step()
        t0 = time.perf_counter()
        step()
        step_s = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            step()
    self_time: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    mm_flop, mm_us = 0, 0.0
    for event in prof.events():
        self_time[event.name] += event.self_cpu_time_total
        calls[event.name] += 1
        if event.name == "aten::mm" and len(event.input_shapes) >= 2:
            (m, k), (_, n) = event.input_shapes[0], event.input_shapes[1]
            mm_flop += 2 * m * k * n
            mm_us += event.self_cpu_time_total
    ranked = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    return {"mode": mode, "seq_len": seq_len, "step_s": round(step_s, 2),
            "self_s": round(sum(self_time.values()) / 1e6, 2),
            "top": [[name, round(us / 1e6, 2), calls[name]] for name, us in ranked],
            "mm_gflop": round(mm_flop / 1e9, 1), "mm_s": round(mm_us / 1e6, 2),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--modes", default="checkpoint,compiled,compiled:4096")
    parser.add_argument("--top", type=int, default=12, help="operators listed per mode")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_len, args.top)), flush=True)
        return
    for mode in check_modes(parser, args.modes):
        row = run_worker(__file__, mode, ["--seq-len", str(args.seq_len), "--top", str(args.top)])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
