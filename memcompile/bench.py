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

Outputs in `--out`: `results.json` (every row and the command), `bench.md` (the table, also
printed) and `bench.png` (peak and step time against tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FIXED_MODES = ("eager", "checkpoint", "inductor", "memcompile")
DEFAULT_MODES = ("eager", "checkpoint", "inductor", "budget_0.5", "budget_0.0", "memcompile")
VALID_MODES_TEXT = (
    "eager, checkpoint, inductor, memcompile, budget_<float in [0, 1]> (e.g. budget_0.5)"
)
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
REFERENCE_MODE = "checkpoint"
DEFAULT_SEED = 0
_BUDGET_RE = re.compile(r"^budget_(.+)$")
_MIB = 2**20
_KIB = 2**10

# Set before torch is imported in the worker: they silence Kineto's and c10's chatter on stderr
# (the profiler that measures the allocator peak prints warnings on every use otherwise).
WORKER_ENV = {"KINETO_LOG_LEVEL": "5", "TORCH_CPP_LOG_LEVEL": "ERROR"}


# --------------------------------------------------------------------------------------------
# Parsing the command line
# --------------------------------------------------------------------------------------------


def parse_seq_lens(text: str) -> list[int]:
    """Parse ``"512,1024,2048"`` into positive, distinct ints; raise `ValueError` otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(
            f"bad --seq-lens {text!r}: write positive integers separated by commas, e.g. 512,1024"
        )
    lens = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"bad sequence length {part!r} in {text!r}: valid are positive integers, "
                "separated by commas, e.g. 512,1024"
            ) from None
        if value <= 0:
            raise ValueError(f"bad sequence length {value} in {text!r}: it must be positive")
        lens.append(value)
    if len(set(lens)) != len(lens):
        raise ValueError(f"bad --seq-lens {text!r}: a length appears twice")
    return lens


def budget_of(mode: str) -> float | None:
    """The activation memory budget of a `budget_<f>` mode, or None for any other mode."""
    match = _BUDGET_RE.match(mode)
    if match is None:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def parse_modes(text: str) -> list[str]:
    """Parse a comma-separated list of modes; raise `ValueError` naming a bad one."""
    modes = [m.strip() for m in text.split(",")]
    if not text.strip() or any(not m for m in modes):
        raise ValueError(f"bad --modes {text!r}: write mode names separated by commas; "
                         f"valid modes: {VALID_MODES_TEXT}")
    for mode in modes:
        if mode not in FIXED_MODES and budget_of(mode) is None:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {VALID_MODES_TEXT}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"bad --modes {text!r}: a mode appears twice")
    return modes


def _parse_override_value(text: str) -> Any:
    """An override's value: an int, a float, true/false/none, else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_model(text: str) -> dict[str, Any]:
    """Parse ``--model``: a preset name, or ``hf:<arch>[:key=value,...]``.

    Returns ``{"kind": "preset", "name": ...}`` or
    ``{"kind": "hf", "arch": ..., "overrides": {...}}``; raises `ValueError` listing what is valid.
    """
    from memcompile.models import HF_ARCHS, PRESETS

    valid = (f"a preset ({', '.join(PRESETS)}) or hf:<arch> with arch one of "
             f"{', '.join(HF_ARCHS)}, optionally hf:<arch>:key=value,... "
             "(e.g. hf:llama:hidden_size=512,num_hidden_layers=4)")
    if not text.startswith("hf:"):
        if text not in PRESETS:
            raise ValueError(f"unknown model {text!r}; valid: {valid}")
        return {"kind": "preset", "name": text}
    arch, _, rest = text[3:].partition(":")
    if arch not in HF_ARCHS:
        raise ValueError(f"unknown Hugging Face arch {arch!r} in {text!r}; valid: {valid}")
    overrides: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or not value.strip():
            raise ValueError(f"bad config override {item!r} in {text!r}: write key=value; "
                             f"valid: {valid}")
        overrides[key] = _parse_override_value(value.strip())
    return {"kind": "hf", "arch": arch, "overrides": overrides}


def parse_options(text: str) -> dict[str, Any]:
    """Parse ``--options`` as a JSON object of memcompile options, validated by `Options`."""
    from memcompile.config import Options

    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--options is not valid JSON ({e}): {text!r}; write a JSON object, "
                         'e.g. \'{"runtime": "inductor"}\'') from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {type(options).__name__}: "
                         f"{text!r}; e.g. '{{\"runtime\": \"inductor\"}}'")
    Options(**options)  # OptionsError (a ValueError) names the bad key and lists the valid ones
    return options


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's `ValueError` into argparse's error, so its message reaches the user."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer; valid: a positive integer") from None
    if value <= 0:
        raise ValueError(f"{value} is not positive; valid: a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; valid: a positive number") from None
    if not value > 0:
        raise ValueError(f"{value} is not positive; valid: a positive number of seconds")
    return value


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
    parser.add_argument("--model", required=True, type=_argtype(parse_model),
                        help="preset (tiny, small, wide) or hf:<arch>[:key=value,...]")
    parser.add_argument("--seq-lens", required=True, type=_argtype(parse_seq_lens),
                        help="comma-separated sequence lengths, e.g. 512,1024,2048")
    parser.add_argument("--modes", type=_argtype(parse_modes), default=list(DEFAULT_MODES),
                        help=f"comma-separated modes (default: {','.join(DEFAULT_MODES)})")
    parser.add_argument("--options", type=_argtype(parse_options), default={},
                        help="JSON object of memcompile options for the memcompile mode")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--batch-size", type=_argtype(_positive_int), default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--repeat", type=_argtype(_positive_int), default=3,
                        help="timed steps whose median is reported (default 3)")
    parser.add_argument("--timeout", type=_argtype(_positive_float), default=900.0,
                        help="seconds allowed per configuration (default 900)")
    parser.add_argument("--jobs", type=_argtype(_positive_int), default=1,
                        help="configurations run side by side (default 1). Peaks are unaffected "
                             "(each process measures its own allocator) but step times compete "
                             "for cores: keep 1 for timings you report")
    parser.set_defaults(func=run_bench_command)
    return parser


# --------------------------------------------------------------------------------------------
# The worker: one configuration, in its own process
# --------------------------------------------------------------------------------------------


def _build(model_spec: Mapping[str, Any], dtype: Any, device: str) -> tuple[Any, int]:
    """The model in training mode, and its vocabulary size."""
    from memcompile.models import build_hf_model, build_model

    if model_spec["kind"] == "preset":
        model = build_model(model_spec["name"], dtype=dtype, seed=DEFAULT_SEED, device=device)
        vocab = model.config.vocab_size
    else:
        model = build_hf_model(model_spec["arch"], dtype=dtype, seed=DEFAULT_SEED,
                               **model_spec["overrides"]).to(device)
        vocab = model.config.vocab_size
    return model.train(), vocab


def _batch(vocab: int, batch_size: int, seq_len: int, device: str) -> dict[str, Any]:
    """Random token ids from a fixed seed; labels are a copy (the models shift them)."""
    import torch

    generator = torch.Generator().manual_seed(DEFAULT_SEED)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _enable_checkpointing(model: Any) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # memcompile.models.LlamaForCausalLM
        model.enable_gradient_checkpointing()
    else:  # Hugging Face
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _wrap(model: Any, mode: str, options: Mapping[str, Any]) -> Any:
    """What the step calls for `mode`: the module itself or a compiled module."""
    import torch

    if mode == "eager":
        return model
    if mode == "checkpoint":
        _enable_checkpointing(model)
        return model
    if mode == "memcompile":
        import memcompile  # noqa: F401  (registers the backend)

        return torch.compile(model, backend="memcompile", options=dict(options))
    # "inductor" and "budget_<f>": torch.compile's defaults (the budget is patched by the caller)
    return torch.compile(model)


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def run_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Build, wrap and measure one (mode, seq_len) configuration; return its result row.

    Raises on any failure; `worker_main` turns that into a failed row.
    """
    import contextlib

    import torch

    import memcompile

    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec["dtype"])
    mode = spec["mode"]
    budget = budget_of(mode)
    patch = (torch._functorch.config.patch(activation_memory_budget=budget)
             if budget is not None else contextlib.nullcontext())
    torch.manual_seed(DEFAULT_SEED)
    with patch:
        model, vocab = _build(spec["model"], dtype, device)
        batch = _batch(vocab, spec["batch_size"], spec["seq_len"], device)
        wrapped = _wrap(model, mode, spec.get("options") or {})

        def step() -> None:
            wrapped(**batch).loss.backward()
            # Every step starts as the first did: weights live, no gradients.
            model.zero_grad(set_to_none=True)

        # The first step compiles; timed on its own so compilation stays out of the median.
        first_seconds = _timed(step, device)
        method = "cuda" if device == "cuda" else "allocator"
        # One more warm-up inside measure: some runtimes settle (caches, lazy init) on step two.
        result = memcompile.measure(step, warmup=1, repeat=spec["repeat"], method=method)
    return {
        "peak_bytes": result.peak_bytes,
        "baseline_bytes": result.baseline_bytes,
        "seconds": result.seconds,
        "first_step_seconds": first_seconds,
        "method": result.method,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "torch_version": torch.__version__,
        "device": device,
        "device_name": _device_name(device),
    }


def _timed(fn: Callable[[], Any], device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker_main(spec_json: str) -> int:
    """Entry of `python -m memcompile.bench --worker SPEC`: print one JSON line with the row."""
    spec = json.loads(spec_json)
    row: dict[str, Any] = {"mode": spec["mode"], "seq_len": spec["seq_len"]}
    try:
        row.update(run_worker(spec), ok=True, error=None)
        code = 0
    except BaseException as e:  # noqa: BLE001  (an OOM or any failure is a failed row)
        if isinstance(e, KeyboardInterrupt):
            raise
        log.exception("configuration %s at %d failed", spec["mode"], spec["seq_len"])
        row.update(ok=False, error=_error_text(e))
        code = 1
    sys.stdout.write("\n" + json.dumps(row) + "\n")
    sys.stdout.flush()
    return code


def _error_text(error: BaseException) -> str:
    """The error's type and first lines: Dynamo wraps backend errors in long messages."""
    lines = str(error).strip().splitlines()
    text = " | ".join(line.strip() for line in lines[:4] if line.strip())
    return f"{type(error).__name__}: {text}"[:1000]


# --------------------------------------------------------------------------------------------
# The driver: one worker process per configuration
# --------------------------------------------------------------------------------------------


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
            name = signal.Signals(-proc.returncode).name
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


def format_command(args: argparse.Namespace) -> str:
    """The `memcompile bench ...` command line that reproduces this run."""
    parts = ["memcompile", "bench", "--model", _model_text(args.model),
             "--seq-lens", ",".join(map(str, args.seq_lens)), "--modes", ",".join(args.modes)]
    if args.options:
        parts += ["--options", json.dumps(args.options)]
    parts += ["--out", str(args.out), "--batch-size", str(args.batch_size),
              "--dtype", args.dtype, "--device", args.device, "--repeat", str(args.repeat),
              "--timeout", f"{args.timeout:g}"]
    if getattr(args, "jobs", 1) != 1:
        parts += ["--jobs", str(args.jobs)]
    return shlex.join(parts)


def _model_text(model: Mapping[str, Any]) -> str:
    if model["kind"] == "preset":
        return model["name"]
    overrides = ",".join(f"{k}={v}" for k, v in model["overrides"].items())
    return f"hf:{model['arch']}" + (f":{overrides}" if overrides else "")


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
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'bench.md'}, "
          f"{args.out / 'bench.png'}")
    return 0


# --------------------------------------------------------------------------------------------
# Results: slope, table, plot
# --------------------------------------------------------------------------------------------


def fit_slope(tokens: Sequence[float], peaks: Sequence[float]) -> float | None:
    """Least-squares slope of `peaks` against `tokens` (bytes per token); None below 2 lengths."""
    if len(tokens) != len(peaks):
        raise ValueError(f"{len(tokens)} token counts but {len(peaks)} peaks")
    if len(set(tokens)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(tokens), statistics.fmean(peaks)
    sxx = sum((x - mean_x) ** 2 for x in tokens)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(tokens, peaks))
    return sxy / sxx


def summarize(rows: Sequence[Mapping[str, Any]], seq_lens: Sequence[int],
              modes: Sequence[str]) -> list[dict[str, Any]]:
    """Per mode: peak bytes per length (None where failed), slope, and time at the longest length.

    Ratios against `checkpoint` are added when that mode is among `modes`.
    """
    longest = max(seq_lens)
    summaries = []
    for mode in modes:
        ok = {r["seq_len"]: r for r in rows if r["mode"] == mode and r.get("ok")}
        points = sorted((ok[s]["tokens"], ok[s]["peak_bytes"]) for s in seq_lens if s in ok)
        summaries.append({
            "mode": mode,
            "peaks": {s: (ok[s]["peak_bytes"] if s in ok else None) for s in seq_lens},
            "slope": fit_slope([p[0] for p in points], [p[1] for p in points]),
            "seconds": ok[longest]["seconds"] if longest in ok else None,
            "first_step_seconds": ok[longest].get("first_step_seconds") if longest in ok else None,
        })
    ref = next((s for s in summaries if s["mode"] == REFERENCE_MODE), None)
    if ref is not None:
        for s in summaries:
            s["slope_ratio"] = _ratio(s["slope"], ref["slope"])
            s["time_ratio"] = _ratio(s["seconds"], ref["seconds"])
    return summaries


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _fmt(value: float | None, *, ratio: bool = False) -> str:
    """Numbers to read at a glance: more decimals for small values; an em dash for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if ratio:
        return f"{value:.2f}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_table(rows: Sequence[Mapping[str, Any]], *, seq_lens: Sequence[int] | None = None,
                 modes: Sequence[str] | None = None) -> str:
    """The markdown table: one row per mode; peaks in MiB, slope in KiB/token, ratios.

    `seq_lens` and `modes` default to those in `rows`, modes in first-seen order.
    """
    seq_lens = sorted(seq_lens or {r["seq_len"] for r in rows})
    modes = list(modes or dict.fromkeys(r["mode"] for r in rows))
    summaries = summarize(rows, seq_lens, modes)
    with_ratios = REFERENCE_MODE in modes
    longest = seq_lens[-1]
    header = (["mode"] + [f"peak MiB @{s}" for s in seq_lens]
              + ["KiB/token", f"step s @{longest}", f"first step s @{longest}"])
    if with_ratios:
        header += [f"slope / {REFERENCE_MODE}", f"time / {REFERENCE_MODE}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [f"`{s['mode']}`"]
        cells += [_fmt(None if p is None else p / _MIB) for p in s["peaks"].values()]
        cells += [_fmt(None if s["slope"] is None else s["slope"] / _KIB),
                  _fmt(s["seconds"]), _fmt(s["first_step_seconds"])]
        if with_ratios:
            cells += [_fmt(s["slope_ratio"], ratio=True), _fmt(s["time_ratio"], ratio=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: Mapping[str, Any]) -> str:
    """`bench.md`: a header with the command, model, dtype, device, measure and date; the table;
    the failed configurations with their errors."""
    rows = results["rows"]
    first_ok = next((r for r in rows if r.get("ok")), {})
    method = first_ok.get("method", "?")
    measure = {"allocator": "CPU allocator peak (torch.profiler [memory] events)",
               "cuda": "CUDA allocator peak"}.get(method, method)
    weights = first_ok.get("param_bytes")
    lines = [
        "# memcompile bench",
        "",
        f"`{results['command']}`",
        "",
        f"Model `{results['model']}`, {results['dtype']}, batch {results['batch_size']}; "
        f"device {first_ok.get('device_name', first_ok.get('device', '?'))}; "
        f"measure: {measure}; torch {first_ok.get('torch_version', '?')}; {results['date']}.",
        "",
        "Peak: the most bytes live during one step (forward, loss, backward) above what is "
        "live when it starts (the weights"
        + (f", {weights / _MIB:.2f} MiB," if weights is not None else "")
        + " and the batch; no gradients). Step time: median of "
        f"{results['repeat']} steps after warm-up; first step: the compile step, timed alone. "
        "KiB/token: least-squares slope of peak against tokens (batch × length).",
        "",
    ]
    if results.get("jobs", 1) > 1:
        lines += [f"Ran {results['jobs']} configurations side by side: the peaks are unaffected, "
                  "the step times competed for cores.", ""]
    lines += [
        render_table(rows, seq_lens=results["seq_lens"], modes=results["modes"]),
    ]
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        lines += ["", "Failed configurations:", ""]
        lines += [f"- `{r['mode']}` at {r['seq_len']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Any], path: Path) -> bool:
    """Write `bench.png`: peak MiB and step time against tokens, one line per mode.

    Returns False (and logs why) when matplotlib is missing or nothing succeeded.
    """
    try:
        from matplotlib.figure import Figure  # the Agg canvas, no global pyplot state
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s", path)
        return False
    rows = [r for r in results["rows"] if r.get("ok")]
    if not rows:
        log.warning("no configuration succeeded; skipping %s", path)
        return False
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    mem_ax, time_ax = fig.subplots(1, 2)
    for mode in results["modes"]:
        points = sorted((r["tokens"], r["peak_bytes"], r["seconds"])
                        for r in rows if r["mode"] == mode)
        if not points:
            continue
        tokens = [p[0] for p in points]
        mem_ax.plot(tokens, [p[1] / _MIB for p in points], marker="o", label=mode)
        time_ax.plot(tokens, [p[2] for p in points], marker="o", label=mode)
    mem_ax.set(xlabel="tokens (batch × length)", ylabel="peak above start (MiB)",
               title=f"peak memory, {results['model']} {results['dtype']}")
    time_ax.set(xlabel="tokens (batch × length)", ylabel="median step time (s)",
                title="step time")
    for ax in (mem_ax, time_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def write_results(results: Mapping[str, Any], out: Path) -> None:
    """Write `results.json`, `bench.md` and `bench.png` into `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(render_markdown(results))
    plot_results(results, out / "bench.png")


# --------------------------------------------------------------------------------------------
# `python -m memcompile.bench`
# --------------------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
