"""The driver: the `bench` subparser, one worker process per configuration, the whole bench, and
the command's entry. It imports `args`; `args` imports nothing of the bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memcompile.bench.args import (DEFAULT_MODES, DEVICES, DTYPES, VALID_MODES_TEXT, _model_text,
                                   _positive_float, argtype, format_command, parse_model,
                                   parse_modes, parse_options, parse_seq_lens, positive_int)
from memcompile.bench.results import (
    _MIB,
    has_plane,
    render_plane_table,
    render_table,
    write_results,
)
from memcompile.bench.worker import worker_main

log = logging.getLogger(__name__)

# Set before torch is imported in the worker: they silence Kineto's and c10's chatter on stderr
# (the profiler that measures the allocator peak prints warnings on every use otherwise).
WORKER_ENV = {"KINETO_LOG_LEVEL": "5", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def run_config(spec: Mapping[str, Any], timeout: float, *,
               threads: int | None = None) -> dict[str, Any]:
    """Run one configuration in a fresh process; return its row (``ok`` False on any failure).

    `threads`: the worker's intra-op threads (OMP_NUM_THREADS), unless the caller's environment
    sets them; None leaves torch's default.
    """
    cmd = [sys.executable, "-m", "memcompile.bench", "--worker", json.dumps(dict(spec))]
    env = {**os.environ, **WORKER_ENV}
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    base = {"mode": spec["mode"], "seq_len": spec["seq_len"]}
    start = time.perf_counter()
    # Popen with its own session rather than subprocess.run: on a timeout the whole process group
    # is killed (Inductor's compile workers too), else reading the pipes could wait on them.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        return {**base, "ok": False, "error": f"timed out after {timeout:g} s",
                "wall_seconds": time.perf_counter() - start}
    except BaseException:
        # Ctrl-C reaches only the driver (the worker has its own session): take the worker down.
        _kill_group(proc)
        raise
    wall = time.perf_counter() - start
    row = _last_json_line(stdout)
    if row is None:
        if proc.returncode < 0:
            try:
                name = signal.Signals(-proc.returncode).name
            except ValueError:  # a number Python has no name for
                name = f"signal {-proc.returncode}"
            hint = " (out of memory?)" if -proc.returncode == signal.SIGKILL else ""
            error = f"worker killed by {name}{hint}"
        else:
            error = f"worker exited with code {proc.returncode} without a result"
        tail = stderr.strip().splitlines()[-5:]
        if tail:
            error += ": " + " | ".join(tail)
        row = {**base, "ok": False, "error": error[:1000]}
    if not row.get("ok"):
        log.debug("worker stderr for %s at %d:\n%s", spec["mode"], spec["seq_len"], stderr)
    return {**row, "wall_seconds": wall}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    """The worker's result: the last stdout line that is a JSON object (others may print too)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (mode, seq_len) of `args` in its own process; write and return the results."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    specs = [{"model": args.model, "mode": mode, "seq_len": seq_len,
              "batch_size": args.batch_size, "dtype": args.dtype, "device": args.device,
              "repeat": args.repeat, "options": args.options}
             for mode in args.modes for seq_len in args.seq_lens]

    jobs = getattr(args, "jobs", 1)
    # Side by side, workers share the cores rather than each spinning up one thread per core.
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def run_one(spec: dict[str, Any]) -> dict[str, Any]:
        log.info("bench: %s at seq_len %d ...", spec["mode"], spec["seq_len"])
        row = run_config(spec, args.timeout, threads=threads)
        row.update(tokens=args.batch_size * spec["seq_len"], batch_size=args.batch_size)
        _log_row(row)
        return row

    # Threads only wait on worker processes; map keeps the rows in the order of the specs.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(run_one, specs))
    results = {
        "command": format_command(args),
        "argv": list(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _model_text(args.model),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_lens": list(args.seq_lens),
        "modes": list(args.modes),
        "options": args.options,
        "repeat": args.repeat,
        "jobs": jobs,
        "rows": rows,
    }
    write_results(results, out)
    return results


def _log_row(row: Mapping[str, Any]) -> None:
    if row["ok"]:
        log.info("  peak %.2f MiB, step %.3f s (first step %.1f s)", row["peak_bytes"] / _MIB,
                 row["seconds"], row["first_step_seconds"])
    else:
        log.warning("  %s at %d failed: %s", row["mode"], row["seq_len"], row["error"])


def run_bench_command(args: argparse.Namespace) -> int:
    """`args.func` of the bench subcommand: run, write the files, print the table; returns 0.

    Failed configurations are rows of the table, not a failure of the command.
    """
    # Progress of a bench that can run for an hour should show even if the caller set no logging.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    results = run_bench(args)
    print(render_table(results["rows"], seq_lens=results["seq_lens"], modes=results["modes"]))
    written = [args.out / name for name in ("results.json", "bench.md", "bench.png")]
    if has_plane(results["modes"]):
        for seq_len in results["seq_lens"]:
            print(f"\npeak against step time at length {seq_len}:")
            print(render_plane_table(results["rows"], seq_len, modes=results["modes"]))
        written.append(args.out / "plane.png")
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object; returns its parser.

    The caller runs ``args.func(args)`` after parsing; `run_bench_command` is that function.
    """
    parser = subparsers.add_parser(
        "bench",
        help="peak memory and step time of training steps, memcompile against the peers",
        description=(
            "Measure one training step (forward, loss, backward) per mode and sequence length, "
            "each in a fresh process: the allocator peak above what is live at the step's start "
            "(CPU allocator through torch.profiler, or CUDA's), and the median step time. "
            f"Modes: {VALID_MODES_TEXT}."
        ),
    )
    parser.add_argument("--model", required=True, type=argtype(parse_model),
                        help="preset (tiny, small, wide) or hf:<arch>[:key=value,...]")
    parser.add_argument("--seq-lens", required=True, type=argtype(parse_seq_lens),
                        help="comma-separated sequence lengths, e.g. 512,1024,2048")
    parser.add_argument("--modes", type=argtype(parse_modes), default=list(DEFAULT_MODES),
                        help=f"comma-separated modes (default: {','.join(DEFAULT_MODES)})")
    parser.add_argument("--options", type=argtype(parse_options), default={},
                        help="JSON object of memcompile options for the memcompile and mcbudget_* "
                             "modes (an mcbudget_* mode sets memory_budget over it)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--batch-size", type=argtype(positive_int), default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--repeat", type=argtype(positive_int), default=3,
                        help="timed steps whose median is reported (default 3)")
    parser.add_argument("--timeout", type=argtype(_positive_float), default=900.0,
                        help="seconds allowed per configuration (default 900)")
    parser.add_argument("--jobs", type=argtype(positive_int), default=1,
                        help="configurations run side by side (default 1). Peaks are unaffected "
                             "(each process measures its own allocator) but step times compete "
                             "for cores: keep 1 for timings you report")
    parser.set_defaults(func=run_bench_command)
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    """`python -m memcompile.bench --worker SPEC` (one configuration) or `... [bench args]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        if len(argv) != 2:
            print("usage: python -m memcompile.bench --worker SPEC_JSON", file=sys.stderr)
            return 2
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return worker_main(argv[1])
    # Also usable without the `memcompile` command: the same subcommand, its name implied.
    parser = argparse.ArgumentParser(prog="python -m memcompile.bench")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)
