"""Compiled chunk bodies (issue 18, point 1) against the Python loop and per-layer
checkpointing: one training step of the built-in `wide` model, float32, on the CPU.

    python benchmarks/chunk_bodies.py --seq-len 8192 --modes checkpoint,loop,compiled

Modes, each in its own process (no compiled code or allocator state shared):

- `checkpoint`: eager with per-layer activation checkpointing (non-reentrant), as
  `memcompile bench`'s `checkpoint` mode.
- `loop`: StreamBP (`stream=True`) with `runtime="eager"`: chunk bodies run node by node in
  Python (`ChunkRunner.run`'s loop).
- `compiled`: StreamBP with the default runtime (Inductor): chunk bodies run as compiled
  segments (`runtime.stream_compiled`).
- `loop:N`, `compiled:N`: the same with chunks of N tokens instead of `chunk_size="auto"`.
- `compiled+keep`, `compiled+keep:N`: the same with `keep_attention` (attention outputs kept
  from the forward pass; the backward skips the attention forward).

Each prints one JSON line: the first step's seconds (compiles included), the median of
`--repeat` steps (wall, and the process's CPU seconds: on a shared machine the second moves less
with the load), the calls of one step (`memcompile.measure_calls`: aten events plus Inductor's
CPU kernels, compiled with kernel profiling on), the compiled bodies' counters, the allocator
peak (`memcompile.measure`, optional) and the load averages before and after.

`--rounds N` runs the list N times, each round starting one mode later, so that a drift in the
machine's speed (a checkpointed step of `wide` at 8,192 tokens has read 82 to 104 s on the same
machine) falls on every mode alike. Calls are counted in the first round only (they do not
change). A last JSON line sums up: per mode, the median over rounds of its time divided by the
first mode's in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def parse_mode(mode: str) -> tuple[str, int | None, bool]:
    """`(runtime, chunk tokens or None for "auto", keep_attention)` of a streamed mode
    ("compiled+keep:2048": the Inductor runtime, chunks of 2,048 tokens, attention outputs
    kept); `checkpoint` is not one. Raises ValueError naming the valid forms."""
    base, _, chunk = mode.partition(":")
    base, plus, keep = base.partition("+")
    if (base not in ("loop", "compiled") or (plus and keep != "keep")
            or (chunk and not (chunk.isdigit() and int(chunk) > 0))):
        raise ValueError(f"unknown mode {mode!r}; valid: checkpoint, or loop / compiled, "
                         "optionally followed by +keep and by :<chunk tokens>, e.g. "
                         "compiled+keep:4096")
    return base, int(chunk) if chunk else None, bool(plus)


def check_modes(parser: argparse.ArgumentParser, modes: str) -> list[str]:
    """The comma-separated `modes`, each checked before any process starts (a bad one exits
    through `parser.error` with `parse_mode`'s message)."""
    listed = modes.split(",")
    for mode in listed:
        if mode != "checkpoint":
            try:
                parse_mode(mode)
            except ValueError as error:
                parser.error(str(error))
    return listed


def _step_fn(mode: str, seq_len: int):
    import torch

    import memcompile  # noqa: F401  (registers the backend)
    from memcompile.models import build_model, make_batch

    model = build_model("wide", dtype=torch.float32)
    batch = make_batch("wide", batch_size=1, seq_len=seq_len)
    if mode == "checkpoint":
        model.enable_gradient_checkpointing()
        call = lambda: model(**batch).loss  # noqa: E731
    else:
        base, chunk, keep = parse_mode(mode)
        stream = {"chunk_size": chunk or "auto", "keep_attention": keep}
        options = {"stream": stream, "runtime": "eager" if base == "loop" else "inductor"}
        loss = torch.compile(lambda b: model(**b).loss, backend="memcompile", options=options)
        call = lambda: loss(batch)  # noqa: E731

    def step() -> None:
        call().backward()
        model.zero_grad(set_to_none=True)

    return step


def worker(mode: str, seq_len: int, repeat: int, peak: bool, calls: bool = True) -> dict:
    import torch

    import memcompile
    from memcompile.measure_calls import count_calls, kernel_profile
    from memcompile.runtime.stream_compiled import STATS

    load_before = os.getloadavg()
    with kernel_profile():  # Inductor's kernels record themselves (compiled inside)
        step = _step_fn(mode, seq_len)
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        times, cpu = [], []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        counted = count_calls(step, device="cpu") if calls else None
        peak_bytes = (memcompile.measure(step, warmup=0, repeat=1, method="allocator").peak_bytes
                      if peak else None)
    return {"mode": mode, "seq_len": seq_len, "first_step_s": round(first, 2),
            "step_s": round(statistics.median(times), 2), "times": [round(t, 2) for t in times],
            "cpu_s": round(statistics.median(cpu), 2),
            **({"aten": counted.aten, "kernels": counted.kernels, "calls": counted.calls,
                "top": counted.top(12)} if counted else {}),
            "graphs": STATS.graphs, "kinds": STATS.kinds,
            "segment_calls": STATS.calls, "fallbacks": STATS.fallbacks,
            "peak_bytes": peak_bytes, "threads": torch.get_num_threads(),
            "load_before": load_before, "load_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--modes", default="checkpoint,loop,compiled")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--peak", action="store_true", help="also measure the allocator peak")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the modes this many times, interleaved (module docstring)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-calls", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.seq_len, args.repeat, args.peak,
                                calls=not args.no_calls)), flush=True)
        return
    modes = check_modes(parser, args.modes)
    rows = []
    for round_ in range(args.rounds):
        for mode in modes[round_ % len(modes):] + modes[:round_ % len(modes)]:
            row = run_worker(__file__, mode, ["--seq-len", str(args.seq_len), "--repeat",
                                              str(args.repeat)] + (
                ["--peak"] if args.peak and round_ == 0 else []) + (
                ["--no-calls"] if round_ else []) + (
                ["--threads", str(args.threads)] if args.threads else []))
            row["round"] = round_
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.rounds > 1:
        print(json.dumps({"summary": summarize(rows, modes[0])}), flush=True)


def run_worker(script: str, mode: str, arguments: list[str]) -> dict:
    """Run `script --worker mode *arguments` in a fresh process and return the JSON object it
    printed last, or a row with the end of its stderr if it printed none."""
    from memcompile.bench.launch import _last_json_line

    out = subprocess.run([sys.executable, script, "--worker", mode, *arguments],
                         capture_output=True, text=True)
    row = _last_json_line(out.stdout)
    return row if row is not None else {"mode": mode, "error": out.stderr[-2000:]}


def summarize(rows: list[dict], reference: str) -> dict:
    """Per mode, the median over rounds of its step's wall and CPU seconds divided by
    `reference`'s in the same round (a round without both is skipped), with the rounds'
    ratios themselves."""
    by_round: dict[int, dict[str, dict]] = {}
    for row in rows:
        if "error" not in row:
            by_round.setdefault(row["round"], {})[row["mode"]] = row
    summary = {}
    for mode in dict.fromkeys(row["mode"] for row in rows):
        ratios = {"wall": [], "cpu": []}
        for found in by_round.values():
            if mode in found and reference in found:
                ratios["wall"].append(found[mode]["step_s"] / found[reference]["step_s"])
                ratios["cpu"].append(found[mode]["cpu_s"] / found[reference]["cpu_s"])
        summary[mode] = {f"{kind}_ratio": round(statistics.median(values), 3) if values else None
                         for kind, values in ratios.items()}
        summary[mode].update({f"{kind}_ratios": [round(v, 3) for v in values]
                              for kind, values in ratios.items()})
    return summary


if __name__ == "__main__":
    main()
