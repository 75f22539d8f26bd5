"""StreamBP against per-layer checkpointing on Hugging Face Llama from default configs.

Every (model, form, mode, length) runs in its own fresh process (`--worker`), so peaks do not
interfere. The models are `transformers.LlamaConfig` with every default kept (`use_cache`
True, the default attention) except their sizes, random weights from a fixed seed, float32,
batch 1, CPU, `model.train()`:

- `small`: 4 layers, hidden 512, intermediate 1408, 8 heads, 2 key/value heads, vocabulary
  32000; at 1,024 and 2,048 tokens.
- `wide`: 8 layers, hidden 1024, intermediate 2816, 16 heads, 4 key/value heads, vocabulary
  4096; at 2,048 and 4,096 tokens.

Gradients exist before the step, as under gradient accumulation: every parameter's `.grad` is
a tensor of zeros, set once and never set to None. A step is forward, loss and backward; no
optimizer. Forms:

- `loss`: `lambda ids: model(input_ids=ids, labels=ids).loss` (compiled in the compiled modes);
  the step is `f(ids).backward()`.
- `trainer`: the model itself (`model.compile(backend="memcompile", ...)` in the compiled
  modes), called as `out = model(input_ids=ids, labels=ids)`; `out` (its logits) stays alive
  until after `out.loss.backward()`, as in a Trainer. `model.config.use_cache = False` in every
  mode (the documented recipe).

Modes: `eager`; `checkpoint` (eager, transformers' activation checkpointing of every decoder
layer, `use_reentrant=False`; transformers turns the cache off per call under it in training);
`memcompile` (`backend="memcompile"` with no options: what a user gets by default); `stream`
(`options={"stream": True}`).

Measured, after the first step (compilation) and `--warmup` more: the peak above what is live
at the step's start (weights and gradients excluded) by the tracked measure
(`memcompile.measure.tracked_peak`: storages returned by ops at the dispatcher) and, on its own
step, by the CPU allocator (`allocator_peak`, profiler memory events). The tracked measure does
not see buffers that Inductor-compiled kernels allocate (tests/test_measure.py), so where a
compiled mode runs Inductor code only the allocator column counts everything. Then the median
wall time of `--repeat` unobserved steps. Last, the calls of one step
(`memcompile.measure_calls.count_calls`: `aten::` operator events plus Inductor's generated CPU
kernels, which every worker compiles with `kernel_profile()` so they are visible); `--calls-only`
skips the peaks and times (a count does not depend on the machine's load).

    python benchmarks/stream_hf.py --out benchmarks/results/stream_hf.md

writes the markdown tables (and the raw rows beside them, `.json`), rewritten after each
configuration so a long run can be watched.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

SEED = 0
MODELS = {
    "small": dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1408,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=32000),
    "wide": dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=2816,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=4096),
}
LENGTHS = {"small": (1024, 2048), "wide": (2048, 4096)}
FORMS = ("loss", "trainer")
MODES = ("eager", "checkpoint", "memcompile", "stream")
REFERENCE = "checkpoint"
COMPARED = ("memcompile", "stream")
# (model, form): (growth / checkpoint's, peak at the long length / checkpoint's,
#                 step time at the long length / checkpoint's); None: no target.
TARGETS = {
    ("small", "loss"): (0.05, None, None),
    ("wide", "loss"): (0.3, 0.6, 1.0),
    ("small", "trainer"): (0.35, None, None),
}
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# The worker: one configuration in a fresh process.


def _code_version() -> str:
    """HEAD and a hash of the uncommitted changes under memcompile/ (the tree is shared and
    may change during a run: rows that ran different code say so)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "memcompile"], cwd=root,
                              capture_output=True, text=True, check=True).stdout
        untracked = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "memcompile"], cwd=root,
            capture_output=True, text=True, check=True).stdout.split()
        blob = diff.encode()
        for path in sorted(untracked):
            if path.endswith(".py"):
                with open(os.path.join(root, path), "rb") as f:
                    blob += path.encode() + f.read()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f"+{hashlib.sha1(blob).hexdigest()[:8]}" if blob else "")


def _build(name: str) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(**MODELS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.LlamaForCausalLM(config)
    return model.float().train()


def _enable_checkpointing(model: Any) -> None:
    # transformers 5 renamed it; the old name is a deprecated alias (a FutureWarning).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _step_fn(model: Any, ids: Any, form: str, mode: str) -> Any:
    """The training step of (form, mode): forward, loss, backward."""
    import torch

    options = {"stream": True} if mode == "stream" else None
    compiled = mode in ("memcompile", "stream")
    if compiled:
        import memcompile  # noqa: F401  (registers the backend)
    if mode == "checkpoint":
        _enable_checkpointing(model)
    if form == "loss":
        def loss_of(ids: Any) -> Any:
            return model(input_ids=ids, labels=ids).loss

        loss = (torch.compile(loss_of, backend="memcompile", options=options)
                if compiled else loss_of)

        def step() -> None:
            loss(ids).backward()
        return step
    if compiled:
        model.compile(backend="memcompile", options=options)

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        del out  # kept alive (logits included) until after the backward, as a Trainer does
    return step


class _Collect:
    """Warnings (Python's and the `transformers`/`memcompile` loggers') seen in the worker."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def add(self, text: str) -> None:
        text = " ".join(text.split())[:400]
        if text not in self.seen:
            self.seen.append(text)


@contextlib.contextmanager
def _collecting(sink: _Collect):
    import logging
    import warnings

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sink.add(f"{record.name}: {record.getMessage()}")

    handler = Handler(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "memcompile")]
    for lg in loggers:
        lg.addHandler(handler)
    # Python's default filters: the warnings a user running this would see.
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
            for w in caught:
                sink.add(f"{w.category.__name__}: {w.message}")


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, wrap and measure one configuration; return its row."""
    import torch
    import transformers

    from memcompile.measure import (allocator_peak, live_cpu_tensor_bytes, tracked_peak,
                                    wall_seconds)
    from memcompile.measure_calls import count_calls, kernel_profile
    from memcompile.report import recording

    load_start = os.getloadavg()
    code = _code_version()
    model_name, form, mode, length = spec["model"], spec["form"], spec["mode"], spec["seq_len"]
    model = _build(model_name)
    if form == "trainer" or spec.get("no_cache"):
        model.config.use_cache = False
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, model.config.vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(SEED))
    warned = _Collect()
    tracked = allocated = baseline = None
    times: list[float] = []
    # Inductor's kernels record themselves (the count sees them) wherever they are compiled.
    with _collecting(warned), kernel_profile():
        step = _step_fn(model, ids, form, mode)
        with recording() as records:
            first = wall_seconds(step)  # compiles
            for _ in range(spec["warmup"]):
                step()
        if not spec.get("calls_only"):
            gc.collect()
            baseline = live_cpu_tensor_bytes()
            tracked = tracked_peak(step)
            gc.collect()
            allocated = allocator_peak(step)
            times = [wall_seconds(step) for _ in range(spec["repeat"])]
        calls = count_calls(step, device="cpu")
    assert all(p.grad is not None for p in model.parameters())
    graphs = [r.kind for r in records]
    notes = [f"{name}: {text}" for r in records for name, text in r.notes
             if "stream" in name or "stream" in text]
    return {
        "tracked_peak_bytes": tracked,
        "allocator_peak_bytes": allocated,
        "baseline_bytes": baseline,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "seconds": statistics.median(times) if times else None,
        "times": times,
        "aten_calls": calls.aten,
        "kernel_calls": calls.kernels,
        "calls": calls.calls,
        "top_calls": calls.top(12),
        "first_step_seconds": first,
        "graphs": graphs,
        "notes": notes,
        "warnings": warned.seen,
        "attn_implementation": model.config._attn_implementation,
        "code": code,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start[0],
        "loadavg_end": os.getloadavg()[0],
    }


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    row: dict[str, Any] = {k: spec[k] for k in ("model", "form", "mode", "seq_len")}
    try:
        row.update(run_worker(spec), ok=True, error=None)
        code = 0
    except Exception as e:  # noqa: BLE001  (any failure is a failed row)
        import traceback

        traceback.print_exc()
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:800]}")
        code = 1
    sys.stdout.write("\n" + json.dumps(row) + "\n")
    sys.stdout.flush()
    return code


# ---------------------------------------------------------------------------------------------
# The driver: one process per configuration, then the tables.


def run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    base = {k: spec[k] for k in ("model", "form", "mode", "seq_len")}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
        return {**base, "ok": False, "error": f"exit {proc.returncode}: {tail[:800]}"}
    row = json.loads(lines[-1])
    row["wall_seconds"] = time.perf_counter() - start
    if not row.get("ok"):
        row["stderr_tail"] = proc.stderr.strip().splitlines()[-20:]
    return row


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / MiB:,.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.3f}"


def _ok_rows(rows: list[dict], model: str, form: str) -> dict[tuple[str, int], dict]:
    return {(r["mode"], r["seq_len"]): r for r in rows
            if r["model"] == model and r["form"] == form and r.get("ok")}


def _value(rows: dict, mode: str, length: int, key: str) -> float | None:
    r = rows.get((mode, length))
    return None if r is None else r.get(key)


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _growth(rows: dict, mode: str, short: int, long: int, key: str) -> float | None:
    a, b = _value(rows, mode, short, key), _value(rows, mode, long, key)
    return None if a is None or b is None else b - a


def section(all_rows: list[dict], model: str, form: str, modes: list[str],
            lengths: tuple[int, ...]) -> str:
    """The markdown of one model/form: rows, calls, and with two lengths growth, ratios,
    targets."""
    short, long = lengths[0], lengths[-1]
    rows = _ok_rows(all_rows, model, form)
    sizes = ", ".join(f"{k}={v}" for k, v in MODELS[model].items())
    out = [f"### `{model}` ({sizes}), form `{form}`", ""]
    out += ["| mode | length | peak MiB (tracked) | peak MiB (allocator) | step s | first step s "
            "| aten calls | Inductor kernels | calls / checkpoint's | memcompile graphs |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    failed = []
    for mode in modes:
        for length in lengths:
            r = next((x for x in all_rows if x["model"] == model and x["form"] == form
                      and x["mode"] == mode and x["seq_len"] == length), None)
            if r is None:
                continue
            if not r.get("ok"):
                out.append(f"| `{mode}` | {length} | failed | | | | | | | |")
                failed.append(f"`{mode}` at {length}: {r.get('error')}")
                continue
            graphs = ", ".join(r["graphs"]) or "—"
            calls = _value(rows, mode, length, "calls")
            out.append(f"| `{mode}` | {length} | {_mib(r['tracked_peak_bytes'])} | "
                       f"{_mib(r['allocator_peak_bytes'])} | {_num(r['seconds'], '.2f')} | "
                       f"{r['first_step_seconds']:.1f} | {_num(r.get('aten_calls'), ',')} | "
                       f"{_num(r.get('kernel_calls'), ',')} | "
                       f"{_ratio(calls, _value(rows, REFERENCE, length, 'calls'))} | {graphs} |")
    out += _calls_detail(rows, modes, lengths)
    if short == long:  # one length: no growth
        return "\n".join(out + _notes(rows, modes, lengths, failed))
    out += ["", f"Growth {short} → {long} tokens and ratios to `{REFERENCE}` at {long}:", "",
            "| mode | growth MiB (tracked) | growth MiB (allocator) | growth / checkpoint's "
            "(tracked) | growth / checkpoint's (allocator) | peak / checkpoint's (tracked) | "
            "peak / checkpoint's (allocator) | time / checkpoint's |",
            "|---|---|---|---|---|---|---|---|"]
    ref = {key: (_growth(rows, REFERENCE, short, long, key), _value(rows, REFERENCE, long, key))
           for key in ("tracked_peak_bytes", "allocator_peak_bytes")}
    ref_time = _value(rows, REFERENCE, long, "seconds")
    for mode in modes:
        g_t = _growth(rows, mode, short, long, "tracked_peak_bytes")
        g_a = _growth(rows, mode, short, long, "allocator_peak_bytes")
        if g_t is None:
            continue
        out.append(
            f"| `{mode}` | {_mib(g_t)} | {_mib(g_a)} | "
            f"{_ratio(g_t, ref['tracked_peak_bytes'][0])} | "
            f"{_ratio(g_a, ref['allocator_peak_bytes'][0])} | "
            f"{_ratio(_value(rows, mode, long, 'tracked_peak_bytes'), ref['tracked_peak_bytes'][1])} | "
            f"{_ratio(_value(rows, mode, long, 'allocator_peak_bytes'), ref['allocator_peak_bytes'][1])} | "
            f"{_ratio(_value(rows, mode, long, 'seconds'), ref_time)} |")
    target = TARGETS.get((model, form))
    if target is not None:
        verdicts = []
        names = ("growth", "peak", "time")
        keys = ("growth", "peak", "seconds")
        for mode in COMPARED:
            if (mode, long) not in rows or (REFERENCE, long) not in rows:
                continue
            parts = []
            for name, key, bound in zip(names, keys, target):
                if bound is None:
                    continue
                if key == "seconds":
                    v = _value(rows, mode, long, "seconds")
                    if v is None or not ref_time:
                        continue
                    v /= ref_time
                    parts.append(f"{name} {v:.3f}x ≤ {bound}: {'met' if v <= bound else 'NOT met'}")
                    continue
                vals = []
                for measure in ("tracked_peak_bytes", "allocator_peak_bytes"):
                    if key == "growth":
                        num, den = _growth(rows, mode, short, long, measure), ref[measure][0]
                    else:
                        num, den = _value(rows, mode, long, measure), ref[measure][1]
                    vals.append(None if num is None or not den else num / den)
                t, a = vals
                if t is None or a is None:
                    continue
                # Met only where both measures meet it: the tracked one does not see buffers
                # that Inductor-compiled code allocates, the allocator sees every storage.
                verdict = "met" if max(t, a) <= bound else "NOT met"
                parts.append(f"{name} {t:.3f}x [{a:.3f}x] ≤ {bound}: {verdict}")
            verdicts.append(f"- `{mode}`: " + "; ".join(parts))
        if verdicts:
            out += ["", "Targets (against `checkpoint`; the tracked measure, the allocator's in "
                    "brackets; met only where both are within the bound):", "", *verdicts]
    return "\n".join(out + _notes(rows, modes, lengths, failed))


def _calls_detail(rows: dict, modes: list[str], lengths: tuple[int, ...]) -> list[str]:
    """The most frequent names among each row's counted calls."""
    out = []
    for mode in modes:
        for length in lengths:
            top = _value(rows, mode, length, "top_calls")
            if top:
                names = ", ".join(f"`{n}` {c:,}" for n, c in top)
                out.append(f"- `{mode}` at {length}: {names}")
    if out:
        out = ["", "Most frequent calls per step (aten events at every nesting level, and "
               "Inductor kernels):", ""] + out
    return out


def _notes(rows: dict, modes: list[str], lengths: tuple[int, ...],
           failed: list[str]) -> list[str]:
    """Inductor-run rows, failures, notes and warnings, under the tables."""
    out: list[str] = []
    notes = []
    for mode in modes:
        for length in lengths:
            r = rows.get((mode, length))
            if r is None:
                continue
            for text in r["notes"] + r["warnings"]:
                entry = f"`{mode}`: {text}"
                if not any(entry == n[0] for n in notes):
                    notes.append((entry, [length]))
                else:
                    next(n for n in notes if n[0] == entry)[1].append(length)
    blind = sorted({f"`{m}` at {n}" for (m, n), r in rows.items()
                    if any(k != "stream" for k in r["graphs"])})
    if blind:
        out += ["", "Ran Inductor-compiled code (a graph of kind other than `stream`), whose "
                "buffers the tracked measure does not see: " + ", ".join(blind) + ". Their "
                "allocator column is the one that counts."]
    if failed:
        out += ["", "Failed:", ""] + [f"- {f}" for f in failed]
    if notes:
        out += ["", "Notes and warnings seen in the workers (at lengths):", ""]
        out += [f"- {entry} ({', '.join(map(str, lens))})" for entry, lens in notes]
    return out


def render(command: str, rows: list[dict], args: argparse.Namespace, started: str,
           done: bool) -> str:
    ok = [r for r in rows if r.get("ok")]
    codes = sorted({r["code"] for r in ok})
    head = [f"`{command}`", ""]
    if ok:
        r = ok[0]
        head.append(f"torch {r['torch']}, transformers {r['transformers']}, CPU, "
                    f"{r['threads']} threads, float32, batch 1, attention "
                    f"`{r['attn_implementation']}`; started {started}; "
                    f"code {', '.join(codes)} (HEAD + hash of uncommitted memcompile/ changes)."
                    + ("" if done else " **Run in progress.**"))
        loads = [x for r in ok for x in (r["loadavg_start"], r["loadavg_end"])]
        head.append(f"Load average (1 min) at worker starts/ends: {min(loads):.1f} to "
                    f"{max(loads):.1f}.")
        head.append("")
    parts = []
    for model in args.models:
        lengths = tuple(args.lengths) if args.lengths else LENGTHS[model]
        for form in args.forms:
            if any(r["model"] == model and r["form"] == form for r in rows):
                parts.append(section(rows, model, form, args.modes, lengths))
    if len(codes) > 1:
        head.append("Rows ran different code versions: " + "; ".join(
            f"{r['model']}/{r['form']}/{r['mode']}/{r['seq_len']}: {r['code']}" for r in ok))
        head.append("")
    return "\n".join(head + ["\n\n".join(parts), ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="small,wide")
    parser.add_argument("--forms", default="loss,trainer")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--lengths", default=None,
                        help="short,long for every model (or one length: no growth); "
                             "default: small 1024,2048 and wide 2048,4096")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="steps after the first (compiling) one before measuring")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    parser.add_argument("--no-cache", action="store_true",
                        help="model.config.use_cache = False in the loss form too (the trainer "
                             "form always sets it)")
    parser.add_argument("--calls-only", action="store_true",
                        help="count one step's calls only: no peaks, no timed steps")
    parser.add_argument("--out", default=None, help="markdown file (and its .json of rows)")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="print the tables of a results .json again (no run)")
    args = parser.parse_args()
    if args.worker is not None:
        return worker_main(args.worker)
    if args.render is not None:
        with open(args.render) as f:
            saved = json.load(f)
        stored = parser.parse_args(shlex.split(saved["command"])[2:])
        _split(stored, parser)
        print(render(saved["command"], saved["rows"], stored, saved["started"], True))
        return 0
    _split(args, parser)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(__file__)] + sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M")
    print(command, flush=True)
    rows: list[dict] = []
    return _run(args, command, started, rows)


def _split(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The comma-separated options as lists, checked."""
    args.models = args.models.split(",")
    args.forms = args.forms.split(",")
    args.modes = args.modes.split(",")
    if args.lengths:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        if len(args.lengths) not in (1, 2):
            parser.error("--lengths takes one length or two: short,long")
    for given, valid, name in ((args.models, MODELS, "models"), (args.forms, FORMS, "forms"),
                               (args.modes, MODES, "modes")):
        bad = [x for x in given if x not in valid]
        if bad:
            parser.error(f"--{name}: unknown {bad}; valid: {', '.join(valid)}")


def _run(args: argparse.Namespace, command: str, started: str, rows: list[dict]) -> int:

    def write(done: bool) -> str:
        text = render(command, rows, args, started, done)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
            with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
                json.dump({"command": command, "started": started, "rows": rows}, f, indent=1)
        return text

    for model in args.models:
        lengths = args.lengths or LENGTHS[model]
        for form in args.forms:
            for mode in args.modes:
                for length in lengths:
                    spec = {"model": model, "form": form, "mode": mode, "seq_len": length,
                            "repeat": args.repeat, "warmup": args.warmup,
                            "no_cache": args.no_cache, "calls_only": args.calls_only}
                    row = run_one(spec, args.timeout)
                    rows.append(row)
                    state = (f"peak {_mib(row['tracked_peak_bytes'])} MiB tracked, "
                             f"{_mib(row['allocator_peak_bytes'])} allocator, "
                             f"{_num(row['seconds'], '.2f')} s/step, {row['calls']:,} calls, "
                             f"worker {row['wall_seconds']:.0f} s, "
                             f"graphs {row['graphs']}" if row.get("ok") else row["error"])
                    print(f"[{time.strftime('%H:%M:%S')}] {model} {form} {mode} {length}: "
                          f"{state}", file=sys.stderr, flush=True)
                    write(False)
    print(write(True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
