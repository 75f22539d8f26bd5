"""Read a `memcompile bench` results file and fit each mode's peak against the length.

For every mode: the least-squares line of the allocator peak above weights and gradients
(peak minus the parameters' bytes, which the gradients occupy at the step's end) against
tokens; its slope relative to per-layer checkpointing's; the step time relative to
checkpointing's at the longest length; and the longest length the line puts under a limit
(2 GiB by default), relative to checkpointing's. Prints a markdown table.

    python benchmarks/stream_fit.py benchmarks/results/stream-cpu/wide/results.json --limit-gib 2

Several results files merge: a later file's rows of a mode replace every earlier row of that
mode (a mode re-measured after a change), and the table lists each file's command.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def table(results: dict, limit_bytes: float, reference: str = "checkpoint") -> str:
    """The markdown table of fitted lines, ratios and the longest length under the limit."""
    rows = defaultdict(list)
    for row in results["rows"]:
        if row.get("ok"):
            rows[row["mode"]].append(row)
    fitted = {}
    for mode, got in rows.items():
        got.sort(key=lambda r: r["tokens"])
        xs = [r["tokens"] for r in got]
        ys = [r["peak_bytes"] - r["param_bytes"] for r in got]
        if len(xs) >= 2:
            intercept, slope = fit(xs, ys)
            longest = (limit_bytes - intercept) / slope if slope > 0 else float("inf")
            fitted[mode] = (intercept, slope, longest, got[-1])
    ref = fitted.get(reference)
    limit_gib = limit_bytes / 2**30
    lines = [f"| mode | lengths | MiB above weights+grads @{ref[3]['tokens'] if ref else '?'} | "
             "KiB/token | slope / checkpoint | time / checkpoint (longest) | "
             f"longest under {limit_gib:g} GiB (fitted) | × checkpoint's |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in results["modes"]:
        if mode not in fitted:
            continue
        intercept, slope, longest, last = fitted[mode]
        lengths = ",".join(str(r["seq_len"]) for r in rows[mode])
        above = (last["peak_bytes"] - last["param_bytes"]) / 2**20
        same = next((r for r in rows[reference] if r["tokens"] == last["tokens"]), None) \
            if ref else None
        time_ratio = f"{last['seconds'] / same['seconds']:.2f}" if same else "—"
        slope_ratio = f"{slope / ref[1]:.3f}" if ref else "—"
        longer = f"{longest / ref[2]:.1f}" if ref else "—"
        lines.append(f"| `{mode}` | {lengths} | {above:,.1f} | {slope / 1024:.1f} | "
                     f"{slope_ratio} | {time_ratio} | {longest / 1000:,.1f}k | {longer} |")
    return "\n".join(lines)


def main() -> None:
    """Print the fitted table for one results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--limit-gib", type=float, default=2.0)
    args = parser.parse_args()
    merged: dict = {"rows": [], "modes": []}
    for path in args.results:
        with open(path) as f:
            results = json.load(f)
        replaced = {r["mode"] for r in results["rows"]}
        merged["rows"] = [r for r in merged["rows"] if r["mode"] not in replaced] + results["rows"]
        merged["modes"] += [m for m in results["modes"] if m not in merged["modes"]]
        print(f"`{results['command']}`\n")
    print(table(merged, args.limit_gib * 2**30))


if __name__ == "__main__":
    main()
