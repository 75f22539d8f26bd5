"""Optimizer-state bytes, peak training-step memory and projector refresh time of AdamW, GaLore
and Natural GaLore (unfused and with per-layer updates fused into the backward).

Run: python benchmarks/optim_memory.py [--preset small] [--seq-len 512] [--ranks 128,256]
         [--modes adamw,galore,natural_galore,galore_fused,natural_galore_fused]
         [--out benchmarks/results/optim-cpu]

Each (mode, rank) row runs in a fresh process (allocator state and compile caches do not leak
between rows): the model is built from a fixed seed, its AdamW (lr 1e-3) swapped by
``memcompile.optim.lowrank`` for the low-rank modes, then compiled with
``torch.compile(model, backend="memcompile")`` and stepped once (compile, optimizer state
created). The peak is ``memcompile.measure(step, method="allocator")`` of one further step
(forward, backward, ``optimizer.step()``, ``zero_grad``) above what is live at its start (weights
and optimizer state). A mode that raises (the fused modes until ``fused_backward=True`` lands) is
a failed row with the error text.

Refresh time: ``memcompile.optim.projector.refresh`` called directly on random gradients of the
projected weights' shapes (all of them, one after another), median of ``--refresh-repeat`` runs,
for ``svd="exact"`` and ``svd="randomized"``. Calling the refresh itself isolates the SVD from the
rest of the step; the difference of a refresh step and a plain step would carry two steps' noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from memcompile.measure import intra_op_threads

log = logging.getLogger(__name__)

MODES = ("adamw", "galore", "natural_galore", "galore_fused", "natural_galore_fused")
"""Benchmarked optimizers: plain AdamW, and the two low-rank methods, unfused and fused."""

MIB = 2**20
LR = 1e-3
SEED = 0


# ------------------------------------------------------------------------------ arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; valid: {', '.join(MODES)}")
    return modes


def _overrides(text: str) -> dict[str, Any]:
    """``key=value,...`` over the preset's LlamaConfig fields (ints, floats or true/false)."""
    fields = {f.name for f in dataclasses.fields(_llama_config_type())}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise argparse.ArgumentTypeError(
                f"bad override {item!r}; use key=value with keys from {sorted(fields)}")
        out[key] = {"true": True, "false": False}.get(value.lower(), None)
        if out[key] is None:
            out[key] = float(value) if any(c in value for c in ".e") else int(value)
    return out


def _llama_config_type() -> type:
    from memcompile.models import LlamaConfig

    return LlamaConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="built-in Llama preset (default small)")
    parser.add_argument("--config", type=_overrides, default={},
                        help="overrides of the preset's fields, e.g. num_layers=8,vocab_size=4096")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ranks", type=_int_list, default=[128, 256],
                        help="GaLore ranks (default 128,256: d/4 and d/2 of the small preset)")
    parser.add_argument("--modes", type=_modes, default=list(MODES))
    parser.add_argument("--runtime", choices=("inductor", "eager"), default="inductor",
                        help="memcompile's runtime (default inductor; eager for quick checks)")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per row (median)")
    parser.add_argument("--refresh-repeat", type=int, default=3,
                        help="timed refreshes per SVD method (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    parser.add_argument("--in-process", action="store_true",
                        help="run rows in this process (faster, but caches leak between rows)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/optim-cpu"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def format_command(args: argparse.Namespace) -> str:
    """The full command line that reproduces ``args`` (every option spelled out)."""
    argv = ["python", "benchmarks/optim_memory.py", "--preset", args.preset,
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--ranks", ",".join(map(str, args.ranks)), "--modes", ",".join(args.modes),
            "--runtime", args.runtime, "--repeat", str(args.repeat),
            "--refresh-repeat", str(args.refresh_repeat), "--out", str(args.out)]
    if args.config:
        argv += ["--config", ",".join(f"{k}={v}" for k, v in args.config.items())]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.in_process:
        argv.append("--in-process")
    return shlex.join(argv)


# -------------------------------------------------------------------------------- one row


def model_config(preset: str, overrides: Mapping[str, Any]) -> Any:
    """The LlamaConfig of ``preset`` with ``overrides`` applied."""
    from memcompile.models.llama import resolve_config

    return dataclasses.replace(resolve_config(preset), **overrides)


def make_optimizer(model: torch.nn.Module, mode: str, rank: int | None) -> torch.optim.Optimizer:
    """AdamW at lr 1e-3, swapped by ``lowrank`` for every mode but ``adamw``."""
    import memcompile

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    if mode == "adamw":
        return opt
    method = mode.removesuffix("_fused")
    return memcompile.optim.lowrank(opt, model=model, rank=rank, method=method,
                                    fused_backward=mode.endswith("_fused"))


def projected_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights ``lowrank(model=...)`` projects (also AdamW's comparison set)."""
    from memcompile.optim import select_weights

    return list(select_weights(model).values())


def run_row(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Build, swap, compile and measure one (mode, rank); raises on any failure."""
    import memcompile
    from memcompile.models import build_model, make_batch
    from memcompile.measure import wall_seconds

    config = model_config(spec["preset"], spec["config"])
    torch.manual_seed(SEED)
    model = build_model(config, seed=SEED)
    batch = make_batch(config, batch_size=spec["batch_size"], seq_len=spec["seq_len"], seed=SEED)
    # Swap before compiling: the fused modes rewrite the backward of the weights registered then.
    opt = make_optimizer(model, spec["mode"], spec["rank"])
    compiled = torch.compile(model, backend="memcompile", options={"runtime": spec["runtime"]})

    def step() -> None:
        compiled(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = wall_seconds(step)  # compiles, creates the optimizer state, refreshes projectors
    weights = projected_weights(model)
    # One more warm-up inside measure, as memcompile bench does: some runtimes settle on step two.
    result = memcompile.measure(step, warmup=1, repeat=spec["repeat"], method="allocator")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "state_bytes_projected": memcompile.optim.state_bytes(opt, weights),
        "state_bytes_total": memcompile.optim.state_bytes(opt),
        "projected_weights": len(weights),
        "projected_weight_bytes": sum(w.numel() * w.element_size() for w in weights),
        "largest_weight_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
        "param_bytes": param_bytes,
        "peak_bytes": result.peak_bytes,
        "baseline_bytes": result.baseline_bytes,
        "step_seconds": result.seconds,
        "first_step_seconds": first,
        "method": result.method,
    }


def error_text(error: BaseException) -> str:
    """The error's type and first lines (Dynamo wraps backend errors in long messages)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {' | '.join(lines[:4])}"[:1000]


def row_in_process(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One row in this process: ``ok`` False with the error text on any failure."""
    row: dict[str, Any] = {"mode": spec["mode"], "rank": spec["rank"]}
    torch._dynamo.reset()
    try:
        with intra_op_threads(spec.get("threads")):
            row.update(run_row(spec), ok=True, error=None, threads=torch.get_num_threads())
    except Exception as e:  # noqa: BLE001  (a failure is a row, its own type and text kept)
        log.warning("%s at rank %s failed: %s", spec["mode"], spec["rank"], error_text(e),
                    exc_info=log.isEnabledFor(logging.DEBUG))
        row.update(ok=False, error=error_text(e))
    return row


def row_in_subprocess(spec: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """One row in a fresh Python process; its result is the last line of its stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(dict(spec))]
    # Silence Kineto's chatter: the allocator measure runs the profiler.
    env = {**os.environ, "KINETO_LOG_LEVEL": "5", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    base = {"mode": spec["mode"], "rank": spec["rank"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "ok": False, "error": f"timed out after {timeout:g} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {**base, "ok": False, "error": f"worker exited {proc.returncode}: {tail}"[:1000]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- refresh time


def refresh_seconds(shapes: Sequence[tuple[int, int]], rank: int, svd: str,
                    repeat: int) -> float:
    """Median seconds to refresh the projectors of weights of ``shapes`` once, all of them."""
    from memcompile.optim.projector import ProjectorSpec, refresh

    spec = ProjectorSpec(rank=rank, svd=svd)
    generator = torch.Generator().manual_seed(SEED)
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    refresh(grads[0], spec)  # warm up LAPACK/BLAS once
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for grad in grads:
            refresh(grad, spec)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def refresh_rows(config: Any, ranks: Sequence[int], repeat: int) -> list[dict[str, Any]]:
    """Exact and randomized refresh time of all projected weights, per rank."""
    from memcompile.models import build_model

    shapes = [tuple(w.shape) for w in projected_weights(build_model(config, seed=SEED))]
    rows = []
    for rank in ranks:
        if rank > min(min(s) for s in shapes):
            rows.append({"rank": rank, "ok": False, "error": "rank exceeds a weight's side"})
            continue
        exact = refresh_seconds(shapes, rank, "exact", repeat)
        randomized = refresh_seconds(shapes, rank, "randomized", repeat)
        rows.append({"rank": rank, "weights": len(shapes), "exact_seconds": exact,
                     "randomized_seconds": randomized, "ok": True})
    return rows


# ---------------------------------------------------------------------------------- output


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.2f}"


def _vs(value: float | None, reference: float | None) -> str:
    """``-69.1%``: the change against AdamW's figure."""
    if value is None or not reference:
        return "-"
    return f"{100.0 * (value - reference) / reference:+.1f}%"


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: the command, the setup, the memory table, the refresh table."""
    rows = results["rows"]
    adamw = next((r for r in rows if r["mode"] == "adamw" and r["ok"]), {})
    first_ok = next((r for r in rows if r["ok"]), None)
    lines = [
        "# Optimizer state and step memory: AdamW, GaLore, Natural GaLore", "",
        f"`{results['command']}`", "",
        f"Model `{results['preset']}` ({results['config']}); batch {results['batch_size']}, "
        f"sequence {results['seq_len']}, float32; `torch.compile(model, backend=\"memcompile\", "
        f"options={{\"runtime\": \"{results['runtime']}\"}})`, optimizer step eager; AdamW lr "
        f"{LR:g}, weight decay 0; GaLore defaults otherwise (proj_type std, gap 200, scale 0.25); "
        f"Natural GaLore history 20. torch {results['torch_version']}, torch threads "
        f"{results['threads']}; {results['date']}.", "",
    ]
    if first_ok:
        lines += [
            f"Weights {_mib(first_ok['param_bytes'])} MiB, of which the "
            f"{first_ok['projected_weights']} projected ones "
            f"{_mib(first_ok['projected_weight_bytes'])} MiB; largest single weight (hence "
            f"gradient) {_mib(first_ok['largest_weight_bytes'])} MiB.", "",
        ]
    lines += [
        "State: bytes in `optimizer.state` (memcompile.optim.state_bytes) over the projected "
        "weights and over all parameters. Peak: CPU allocator peak (memcompile.measure, "
        "method \"allocator\") of one step (forward, backward, `optimizer.step()`, "
        "`zero_grad`) above what is live at its start (weights, optimizer state, batch), after "
        "a warm-up step; a step between projector refreshes. Step s: median of the timed steps.",
        "",
        "| mode | rank | state, projected MiB | vs AdamW | state, all MiB | vs AdamW | "
        "peak step MiB | vs AdamW | live at start MiB | step s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rank = "-" if r["rank"] is None else str(r["rank"])
        if not r["ok"]:
            lines.append(f"| `{r['mode']}` | {rank} | - | - | - | - | - | - | - | - | "
                         f"failed: {r['error'].replace('|', '/')} |")
            continue
        lines.append(
            f"| `{r['mode']}` | {rank} | {_mib(r['state_bytes_projected'])} | "
            f"{_vs(r['state_bytes_projected'], adamw.get('state_bytes_projected'))} | "
            f"{_mib(r['state_bytes_total'])} | "
            f"{_vs(r['state_bytes_total'], adamw.get('state_bytes_total'))} | "
            f"{_mib(r['peak_bytes'])} | {_vs(r['peak_bytes'], adamw.get('peak_bytes'))} | "
            f"{_mib(r['baseline_bytes'])} | {r['step_seconds']:.3f} | |")
    lines += [
        "", "Projector refresh: one refresh of every projected weight "
        "(`memcompile.optim.projector.refresh` on random float32 gradients of the weights' "
        "shapes), median seconds; randomized: oversample 8, power iterations 2.", "",
        "| rank | weights | exact s | randomized s | exact / randomized |", "|---|---|---|---|---|",
    ]
    for r in results["refresh"]:
        if not r["ok"]:
            lines.append(f"| {r['rank']} | - | - | - | failed: {r['error']} |")
            continue
        lines.append(f"| {r['rank']} | {r['weights']} | {r['exact_seconds']:.4f} | "
                     f"{r['randomized_seconds']:.4f} | "
                     f"{r['exact_seconds'] / r['randomized_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every row and the refresh timing; write ``memory.md`` and ``memory.json``."""
    config = model_config(args.preset, args.config)
    specs = []
    for mode in args.modes:
        # AdamW's figures do not depend on the rank: one row.
        for rank in ([None] if mode == "adamw" else args.ranks):
            specs.append({"preset": args.preset, "config": args.config, "mode": mode,
                          "rank": rank, "seq_len": args.seq_len, "batch_size": args.batch_size,
                          "runtime": args.runtime, "repeat": args.repeat,
                          "threads": args.threads})
    rows = []
    for spec in specs:
        log.info("row %s rank %s", spec["mode"], spec["rank"])
        row = (row_in_process(spec) if args.in_process
               else row_in_subprocess(spec, args.timeout))
        rows.append(row)
    with intra_op_threads(args.threads):
        refresh = refresh_rows(config, args.ranks, args.refresh_repeat)
        threads = torch.get_num_threads()
    results = {
        "command": format_command(args), "preset": args.preset,
        "config": dataclasses.asdict(config), "seq_len": args.seq_len,
        "batch_size": args.batch_size, "runtime": args.runtime, "rows": rows,
        "refresh": refresh, "torch_version": torch.__version__, "threads": threads,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "memory.md").write_text(render_markdown(results))
    log.info("wrote %s and %s", args.out / "memory.md", args.out / "memory.json")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the driver, or (``--worker SPEC``) one row printed as a JSON line."""
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        row = row_in_process(json.loads(args.worker))
        sys.stdout.write("\n" + json.dumps(row) + "\n")
        return 0 if row["ok"] else 1
    results = run(args)
    print((args.out / "memory.md").read_text())
    # Failed rows are results too (the fused modes until they land): fail only if none ran.
    return 0 if any(r["ok"] for r in results["rows"]) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(main())
