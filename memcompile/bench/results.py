"""The bench's results: slope of peak against tokens, the table, `bench.md`, `bench.png`, and,
when budget sweeps ran, the plane of peak against step time (`plane.png` and a table per length).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memcompile.bench.args import budget_of, is_budget_mode, mc_budget_options
from memcompile.bench.worker import BUDGET_UNREACHABLE

log = logging.getLogger(__name__)

REFERENCE_MODE = "checkpoint"
_MIB = 2**20
_KIB = 2**10


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
            "calls": ok[longest].get("calls") if longest in ok else None,
        })
    ref = next((s for s in summaries if s["mode"] == REFERENCE_MODE), None)
    if ref is not None:
        for s in summaries:
            s["slope_ratio"] = _ratio(s["slope"], ref["slope"])
            s["time_ratio"] = _ratio(s["seconds"], ref["seconds"])
            s["calls_ratio"] = _ratio(s["calls"], ref["calls"])
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
    """The markdown table: one row per mode; peaks in MiB, slope in KiB/token, ratios, and
    where the rows counted them, the calls of one step at the longest length
    (`memcompile.measure_calls`) with their ratio.

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
    with_calls = any(r.get("calls") is not None for r in rows if r.get("ok"))
    if with_calls:
        header += [f"calls @{longest}"] + ([f"calls / {REFERENCE_MODE}"] if with_ratios else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [f"`{s['mode']}`"]
        cells += [_fmt(None if p is None else p / _MIB) for p in s["peaks"].values()]
        cells += [_fmt(None if s["slope"] is None else s["slope"] / _KIB),
                  _fmt(s["seconds"]), _fmt(s["first_step_seconds"])]
        if with_ratios:
            cells += [_fmt(s["slope_ratio"], ratio=True), _fmt(s["time_ratio"], ratio=True)]
        if with_calls:
            cells += ["—" if s["calls"] is None else f"{s['calls']:,}"]
            cells += [_fmt(s["calls_ratio"], ratio=True)] if with_ratios else []
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
        "KiB/token: least-squares slope of peak against tokens (batch × length)."
        + (" Calls: of one more step, counted by torch.profiler: on the CPU `aten::` operator "
           "events (nested ones too) plus Inductor's generated kernels, on CUDA kernel "
           "launches (`memcompile.measure_calls`)." if any("calls" in r for r in rows) else ""),
        "",
    ]
    if results.get("jobs", 1) > 1:
        lines += [f"Ran {results['jobs']} configurations side by side: the peaks are unaffected, "
                  "the step times competed for cores.", ""]
    lines += [
        render_table(rows, seq_lens=results["seq_lens"], modes=results["modes"]),
    ]
    if has_plane(results["modes"]):
        lines += ["", "## Peak against step time", "",
                  "Every mode at each length, sorted by peak; `budget_<f>` is torch's "
                  "`activation_memory_budget`, `mcbudget_<x>` memcompile's `memory_budget`. "
                  "Plot: `plane.png`."]
        for seq_len in results["seq_lens"]:
            lines += ["", f"### Sequence length {seq_len}", "",
                      render_plane_table(rows, seq_len, modes=results["modes"])]
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


def has_plane(modes: Sequence[str]) -> bool:
    """Whether the plane outputs apply: more than one budget mode (`budget_*`, `mcbudget_*`)."""
    return sum(map(is_budget_mode, modes)) > 1


def _series(mode: str) -> str:
    """Which series of the plane a mode belongs to: "torch", "memcompile", or "single"."""
    if budget_of(mode) is not None:
        return "torch"
    if mc_budget_options(mode) is not None:
        return "memcompile"
    return "single"


def plane_points(rows: Sequence[Mapping[str, Any]], seq_len: int,
                 modes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One point per mode at `seq_len`: peak MiB, step seconds, time / `checkpoint`, the series
    and a note (why there is no point); sorted by peak, modes without a peak last.

    `modes` defaults to those in `rows`, in first-seen order.
    """
    at_len = {r["mode"]: r for r in rows if r["seq_len"] == seq_len}
    modes = list(modes or at_len)
    ref = at_len.get(REFERENCE_MODE, {})
    ref_seconds = ref.get("seconds") if ref.get("ok") else None
    points = []
    for mode in modes:
        row = at_len.get(mode)
        ok = bool(row and row.get("ok"))
        note = ""
        if row is None:
            note = "not run"
        elif row.get("status") == BUDGET_UNREACHABLE:
            least = row.get("least_peak_bytes")  # simulated by the planner, not measured
            note = BUDGET_UNREACHABLE + (f" (planner's least simulated peak {_fmt(least / _MIB)} "
                                         "MiB)" if least is not None else "")
        elif not ok:
            note = "failed"
        points.append({
            "mode": mode, "series": _series(mode),
            "peak_mib": row["peak_bytes"] / _MIB if ok else None,
            "planned_mib": (row["planned_peak_bytes"] / _MIB
                            if ok and row.get("planned_peak_bytes") is not None else None),
            "seconds": row["seconds"] if ok else None,
            "time_ratio": _ratio(row["seconds"], ref_seconds) if ok else None,
            "note": note,
        })
    return sorted(points, key=lambda p: (p["peak_mib"] is None, p["peak_mib"] or 0.0))


def render_plane_table(rows: Sequence[Mapping[str, Any]], seq_len: int,
                       modes: Sequence[str] | None = None) -> str:
    """The markdown table of `plane_points` at `seq_len`: every mode, sorted by peak."""
    header = ["mode", "peak MiB", "planned MiB", "step s", f"time / {REFERENCE_MODE}", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in plane_points(rows, seq_len, modes):
        cells = [f"`{p['mode']}`", _fmt(p["peak_mib"]), _fmt(p["planned_mib"]), _fmt(p["seconds"]),
                 _fmt(p["time_ratio"], ratio=True), p["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_plane(results: Mapping[str, Any], path: Path) -> bool:
    """Write `plane.png`: step time (x) against peak MiB (y), one panel per sequence length.

    torch's `budget_*` points are one series, memcompile's `mcbudget_*` another (each point
    labelled with its budget), the other modes labelled single points. Returns False (and logs
    why) when matplotlib is missing or no configuration succeeded.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s", path)
        return False
    if not any(r.get("ok") for r in results["rows"]):
        log.warning("no configuration succeeded; skipping %s", path)
        return False
    seq_lens = results["seq_lens"]
    fig = Figure(figsize=(7 * len(seq_lens), 5.5), layout="constrained")
    axes = fig.subplots(1, len(seq_lens), squeeze=False)[0]
    styles = {"torch": ("o", "torch activation_memory_budget (budget_*)"),
              "memcompile": ("s", "memcompile memory_budget (mcbudget_*)")}
    for ax, seq_len in zip(axes, seq_lens):
        points = [p for p in plane_points(results["rows"], seq_len, results["modes"])
                  if p["peak_mib"] is not None]
        for series, (marker, label) in styles.items():
            pts = [p for p in points if p["series"] == series]
            if not pts:
                continue
            # Points, not a line: neither time nor peak is monotone in the budget.
            drawn = ax.plot([p["seconds"] for p in pts], [p["peak_mib"] for p in pts],
                            marker=marker, linestyle="", markersize=7, alpha=0.85, label=label)
            for p in pts:
                ax.annotate(p["mode"].partition("_")[2], (p["seconds"], p["peak_mib"]),
                            textcoords="offset points", xytext=(4, 4), fontsize="x-small",
                            color=drawn[0].get_color())
        for p in (p for p in points if p["series"] == "single"):
            ax.plot([p["seconds"]], [p["peak_mib"]], marker="D", color="black", linestyle="")
            ax.annotate(p["mode"], (p["seconds"], p["peak_mib"]), textcoords="offset points",
                        xytext=(4, -10), fontsize="small")
        ax.set(xlabel="median step time (s)", ylabel="peak above start (MiB)")
        # Hugging Face models carry their overrides in the name: wrap rather than clip.
        ax.set_title(textwrap.fill(f"{results['model']} {results['dtype']}, length {seq_len}",
                                   70), fontsize="medium")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def write_results(results: Mapping[str, Any], out: Path) -> None:
    """Write `results.json`, `bench.md` and `bench.png` into `out`, and `plane.png` when more
    than one budget mode ran."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(render_markdown(results))
    plot_results(results, out / "bench.png")
    if has_plane(results["modes"]):
        plot_plane(results, out / "plane.png")
