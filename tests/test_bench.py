"""Tests of `memcompile bench`: argument parsing, slope fitting, the table, the plane of peak
against step time, one real run."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import pytest

from memcompile import bench
from memcompile.bench import (
    DEFAULT_MODES,
    add_bench_parser,
    fit_slope,
    parse_model,
    parse_modes,
    parse_options,
    parse_seq_lens,
    render_markdown,
    render_table,
)

MIB = 2**20
KIB = 2**10


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memcompile")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def parse(*argv: str) -> argparse.Namespace:
    return make_parser().parse_args(["bench", *argv])


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The message argparse prints for a bad command line (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------- parsing


def test_parse_defaults():
    args = parse("--model", "tiny", "--seq-lens", "512,1024", "--out", "x")
    assert args.model == {"kind": "preset", "name": "tiny"}
    assert args.seq_lens == [512, 1024]
    assert args.modes == list(DEFAULT_MODES)
    assert args.modes == ["eager", "checkpoint", "inductor", "budget_0.5", "budget_0.0",
                          "memcompile"]
    assert (args.options, args.batch_size, args.dtype, args.repeat, args.timeout, args.jobs) == (
        {}, 1, "float32", 3, 900.0, 1
    )
    assert args.func is bench.run_bench_command


def test_parse_everything():
    args = parse(
        "--model",
        "hf:llama:hidden_size=512,num_hidden_layers=4,rope_theta=1e4,tie_word_embeddings=true",
        "--seq-lens", " 64, 128 ", "--modes", "memcompile,budget_0.25,eager",
        "--options", '{"runtime": "eager"}', "--out", "o", "--batch-size", "2",
        "--dtype", "float64", "--repeat", "5", "--timeout", "30",
    )
    assert args.model == {
        "kind": "hf", "arch": "llama",
        "overrides": {"hidden_size": 512, "num_hidden_layers": 4, "rope_theta": 1e4,
                      "tie_word_embeddings": True},
    }
    assert args.seq_lens == [64, 128]
    assert args.modes == ["memcompile", "budget_0.25", "eager"]
    assert args.options == {"runtime": "eager"}
    assert (args.batch_size, args.dtype, args.repeat, args.timeout) == (2, "float64", 5, 30.0)
    # The recorded command parses back to the same arguments.
    again = make_parser().parse_args(shlex.split(bench.format_command(args))[1:])
    assert vars(again) == vars(args)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "huge"], ["unknown model 'huge'", "tiny", "small", "wide", "hf:<arch>"]),
        (["--model", "hf:bert"], ["unknown Hugging Face arch 'bert'", "llama", "gpt2"]),
        (["--model", "hf:llama:hidden_size"], ["bad config override 'hidden_size'", "key=value"]),
        (["--seq-lens", "64,abc"], ["bad sequence length 'abc'", "positive integers"]),
        (["--seq-lens", "64,0"], ["bad sequence length 0", "positive"]),
        (["--seq-lens", "64,,128"], ["bad --seq-lens", "positive integers"]),
        (["--seq-lens", "64,64"], ["appears twice"]),
        (["--modes", "eager,fast"], ["unknown mode 'fast'", "eager, checkpoint, inductor",
                                     "budget_<float in [0, 1]>"]),
        (["--modes", "budget_1.5"], ["unknown mode 'budget_1.5'", "budget_<float in [0, 1]>"]),
        (["--modes", "budget_x"], ["unknown mode 'budget_x'"]),
        (["--modes", "mcbudget_0"], ["unknown mode 'mcbudget_0'", "mcbudget_<float in (0, 1]>",
                                     "mcbudget_auto", "mcbudget_none"]),
        (["--modes", "mcbudget_1.5"], ["unknown mode 'mcbudget_1.5'", "mcbudget_<float"]),
        (["--modes", "mcbudget_fast"], ["unknown mode 'mcbudget_fast'", "mcbudget_auto"]),
        (["--modes", "mcbudget_"], ["unknown mode 'mcbudget_'"]),
        (["--modes", "mcbudget_0.5,mcbudget_0.5"], ["appears twice"]),
        (["--options", "{runtime: eager}"], ["--options is not valid JSON", '"runtime"']),
        (["--options", "[1, 2]"], ["must be a JSON object, got list"]),
        (["--options", '{"runtim": "eager"}'], ["'runtim'", "unknown option", "runtime"]),
        (["--options", '{"runtime": "fast"}'], ["'runtime'", "inductor, eager"]),
        (["--batch-size", "0"], ["--batch-size", "not positive"]),
        (["--dtype", "int8"], ["--dtype", "float32"]),
        (["--repeat", "x"], ["--repeat", "not an integer"]),
    ],
)
def test_parse_errors(capsys, argv, expected):
    base = {"--model": "tiny", "--seq-lens": "64", "--out": "o"}
    base.update(zip(argv[::2], argv[1::2]))
    err = parse_error(capsys, *[x for kv in base.items() for x in kv])
    for text in expected:
        assert text in err, err


def test_missing_required(capsys):
    err = parse_error(capsys, "--seq-lens", "64", "--out", "o")
    assert "--model" in err


def test_parse_functions_directly():
    assert parse_seq_lens("1") == [1]
    assert parse_modes("budget_0,budget_1.0") == ["budget_0", "budget_1.0"]
    assert bench.budget_of("budget_0.5") == 0.5
    assert bench.budget_of("inductor") is None
    assert parse_model("hf:gpt2") == {"kind": "hf", "arch": "gpt2", "overrides": {}}
    assert parse_model("hf:qwen2:attn_implementation=eager")["overrides"] == {
        "attn_implementation": "eager"}
    assert parse_options("{}") == {}
    with pytest.raises(ValueError, match="valid modes"):
        parse_modes("")


def test_stream_modes_and_their_keep_attention_twins():
    from memcompile.bench.args import stream_options_of
    assert parse_modes("stream,stream_keep,stream_c2_keep,stream_g2_keep") == [
        "stream", "stream_keep", "stream_c2_keep", "stream_g2_keep"]
    assert stream_options_of("stream_keep") == {"keep_attention": True}
    assert stream_options_of("stream_c2_keep") == {"checkpoints": 2, "keep_attention": True}
    for mode in ("stream_keep_keep", "inductor_keep", "stream_c0_keep"):
        assert stream_options_of(mode) is None, mode
        with pytest.raises(ValueError, match="unknown mode"):
            parse_modes(mode)


def test_parse_mc_budget_modes():
    modes = "eager,budget_0.5,mcbudget_0.5,mcbudget_1,mcbudget_280MiB,mcbudget_auto,mcbudget_none"
    assert parse_modes(modes) == modes.split(",")
    assert bench.mc_budget_options("mcbudget_0.5") == {"memory_budget": 0.5}
    assert bench.mc_budget_options("mcbudget_280MiB") == {"memory_budget": "280MiB"}
    assert bench.mc_budget_options("mcbudget_1.5GiB") == {"memory_budget": "1.5GiB"}
    one = bench.mc_budget_options("mcbudget_1")["memory_budget"]
    assert one == 1.0 and isinstance(one, float)  # an int budget would mean 1 byte
    assert bench.mc_budget_options("mcbudget_auto") == {"memory_budget": "auto"}
    assert bench.mc_budget_options("mcbudget_none") == {"memory_budget": None}
    for mode in ("memcompile", "budget_0.5", "mcbudget_0", "mcbudget_nan", "mcbudget_x",
                 "mcbudget_4096", "mcbudget_280lbs", "mcbudget_0MiB"):
        assert bench.mc_budget_options(mode) is None, mode
    assert [bench.is_budget_mode(m) for m in modes.split(",")] == [False] + [True] * 6
    # The recorded command parses back to the same modes.
    args = parse("--model", "tiny", "--seq-lens", "64", "--out", "o", "--modes", modes)
    again = make_parser().parse_args(shlex.split(bench.format_command(args))[1:])
    assert again.modes == args.modes


def test_mc_budget_mode_sets_memory_budget_over_options(monkeypatch):
    import torch

    from memcompile.bench import worker

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    options = {"runtime": "eager", "memory_budget": "auto"}
    worker._wrap("model", "mcbudget_0.4", options)
    worker._wrap("model", "mcbudget_none", options)
    worker._wrap("model", "memcompile", options)
    assert [c["backend"] for c in calls] == ["memcompile"] * 3
    assert [c["options"] for c in calls] == [
        {"runtime": "eager", "memory_budget": 0.4},
        {"runtime": "eager", "memory_budget": None},
        options,
    ]
    assert options == {"runtime": "eager", "memory_budget": "auto"}  # not changed in place


# ----------------------------------------------------------------------------------- slopes


def test_fit_slope_exact_line():
    tokens = [512, 1024, 2048, 4096]
    assert fit_slope(tokens, [3 * t + 1000 for t in tokens]) == pytest.approx(3.0, rel=1e-12)


def test_fit_slope_least_squares():
    # Points (0, 0), (1, 1), (2, 1): slope = Sxy / Sxx = 1 / 2.
    assert fit_slope([0, 1, 2], [0, 1, 1]) == pytest.approx(0.5, rel=1e-12)


def test_fit_slope_needs_two_lengths():
    assert fit_slope([512], [100]) is None
    assert fit_slope([], []) is None
    with pytest.raises(ValueError):
        fit_slope([1, 2], [1])


# ------------------------------------------------------------------------------------ table


def row(mode: str, seq_len: int, peak_mib: float | None, seconds: float = 1.0) -> dict:
    if peak_mib is None:
        return {"mode": mode, "seq_len": seq_len, "tokens": seq_len, "ok": False,
                "error": "worker killed by SIGKILL (out of memory?)"}
    return {"mode": mode, "seq_len": seq_len, "tokens": seq_len, "ok": True, "error": None,
            "peak_bytes": int(peak_mib * MIB), "baseline_bytes": 10 * MIB,
            "param_bytes": 8 * MIB, "seconds": seconds, "first_step_seconds": 20.0,
            "method": "allocator", "torch_version": "2.13.0", "device": "cpu",
            "device_name": "cpu (2 threads)"}


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table lines by their first cell, split into cells."""
    cells = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| `")]
    return {c[0].strip().strip("`"): [x.strip() for x in c[1:]] for c in cells}


def synthetic_rows() -> list[dict]:
    # Slopes in KiB/token: checkpoint 512 MiB over 1024 tokens = 512 KiB/token; eager 1024;
    # memcompile 128. Times at 2048: checkpoint 2 s, eager 1 s, memcompile 3 s.
    return [
        row("eager", 1024, 1024, 0.5), row("eager", 2048, 2048, 1.0),
        row("checkpoint", 1024, 600, 1.0), row("checkpoint", 2048, 1112, 2.0),
        row("memcompile", 1024, 100, 1.5), row("memcompile", 2048, 228, 3.0),
        row("inductor", 1024, 700), row("inductor", 2048, None),
    ]


def test_render_table_values_and_ratios():
    text = render_table(synthetic_rows())
    header = text.splitlines()[0]
    assert "peak MiB @1024" in header and "peak MiB @2048" in header
    assert "slope / checkpoint" in header and "time / checkpoint" in header
    rows = table_rows(text)
    assert list(rows) == ["eager", "checkpoint", "memcompile", "inductor"]
    # peak@1024, peak@2048, KiB/token, step s, first step s, slope ratio, time ratio
    assert rows["eager"] == ["1,024", "2,048", "1,024", "1.00", "20.0", "2.00", "0.50"]
    assert rows["checkpoint"] == ["600.0", "1,112", "512.0", "2.00", "20.0", "1.00", "1.00"]
    assert rows["memcompile"] == ["100.0", "228.0", "128.0", "3.00", "20.0", "0.25", "1.50"]
    # A failed length: no peak there, no slope from one point, no time at the longest length.
    assert rows["inductor"] == ["700.0", "—", "—", "—", "—", "—", "—"]


def test_render_table_slope_in_kib_per_token():
    text = render_table([row("eager", 100, 1.0), row("eager", 200, 2.0)])
    # 1 MiB more over 100 more tokens: 10.24 KiB/token.
    assert table_rows(text)["eager"][2] == "10.2"
    assert "checkpoint" not in text.splitlines()[0]  # no ratio columns without checkpoint


def test_render_table_orders_modes_and_lengths():
    rows = [row("b", 64, 1.0), row("a", 32, 1.0), row("b", 32, 1.0), row("a", 64, 1.0)]
    text = render_table(rows)
    assert list(table_rows(text)) == ["b", "a"]
    assert text.index("@32") < text.index("@64")
    assert list(table_rows(render_table(rows, modes=["a", "b"]))) == ["a", "b"]


def test_render_markdown_header_and_failures():
    results = {"command": "memcompile bench --model tiny", "model": "tiny", "dtype": "float32",
               "batch_size": 1, "date": "2025-01-01T00:00:00+00:00", "repeat": 3,
               "seq_lens": [1024, 2048], "modes": ["eager", "checkpoint", "memcompile",
                                                   "inductor"],
               "rows": synthetic_rows()}
    text = render_markdown(results)
    assert "`memcompile bench --model tiny`" in text
    for part in ("tiny", "float32", "cpu (2 threads)", "CPU allocator peak", "2025-01-01",
                 "torch 2.13.0", "8.00 MiB"):
        assert part in text
    assert "`inductor` at 2048: worker killed by SIGKILL (out of memory?)" in text


# ---------------------------------------------------------------------------------- workers


def test_last_json_line_skips_other_output():
    out = 'compiling...\n{"not json\n{"mode": "eager", "ok": true}\ntrailing words\n'
    assert bench._last_json_line(out) == {"mode": "eager", "ok": True}
    assert bench._last_json_line("nothing here\n") is None


def test_worker_failure_is_a_row(capsys):
    spec = {"model": {"kind": "preset", "name": "no-such-preset"}, "mode": "eager",
            "seq_len": 8, "batch_size": 1, "dtype": "float32", "device": "cpu", "repeat": 1,
            "options": {}}
    assert bench.worker_main(json.dumps(spec)) == 1
    result = bench._last_json_line(capsys.readouterr().out)
    assert result["ok"] is False and result["mode"] == "eager" and result["seq_len"] == 8
    assert "no-such-preset" in result["error"]


def test_run_config_timeout_is_a_row():
    spec = {"model": {"kind": "preset", "name": "tiny"}, "mode": "eager", "seq_len": 8,
            "batch_size": 1, "dtype": "float32", "device": "cpu", "repeat": 1, "options": {}}
    result = bench.run_config(spec, timeout=0.2)  # python cannot even import torch in 0.2 s
    assert result["ok"] is False
    assert result["error"] == "timed out after 0.2 s"


def wrappedbudget_error_of() -> Exception:
    """A `MemoryBudgetError` as Dynamo raises it: inside another error, ``from None``."""
    from memcompile.errors import MemoryBudgetError

    try:
        try:
            raise MemoryBudgetError(1000, 5 * MIB)
        except MemoryBudgetError:
            raise RuntimeError("backend='memcompile' raised: ...") from None
    except RuntimeError as outer:
        return outer


def test_unreachable_budget_is_a_row(monkeypatch, capsys):
    from memcompile.bench import worker

    def run_worker(spec):
        raise wrappedbudget_error_of()

    monkeypatch.setattr(worker, "run_worker", run_worker)
    spec = {"mode": "mcbudget_0.1", "seq_len": 8}
    assert worker.worker_main(json.dumps(spec)) == 1
    result = bench._last_json_line(capsys.readouterr().out)
    assert result["ok"] is False and result["mode"] == "mcbudget_0.1"
    assert result["status"] == "budget unreachable"
    assert (result["least_peak_bytes"], result["budget_bytes"]) == (5 * MIB, 1000)
    assert result["error"].startswith("budget unreachable: MemoryBudgetError: memory_budget of")


def test_other_failures_have_no_budget_status():
    from memcompile.bench import worker

    assert worker.budget_error_of(RuntimeError("out of memory")) is None
    assert worker.budget_error_of(wrappedbudget_error_of()).least_peak_bytes == 5 * MIB


# ------------------------------------------------------------------------------------ plane


def plane_rows() -> list[dict]:
    """One length (1024), every kind of point: singles, both sweeps, unreachable, failed."""
    unreachable = {"mode": "mcbudget_0.2", "seq_len": 1024, "tokens": 1024, "ok": False,
                   "status": "budget unreachable", "least_peak_bytes": 150 * MIB,
                   "budget_bytes": 80 * MIB, "error": "budget unreachable: MemoryBudgetError"}
    return [
        row("eager", 1024, 550, 4.0), row("checkpoint", 1024, 390, 5.0),
        row("inductor", 1024, 320, 4.0), row("budget_0.5", 1024, 270, 4.5),
        row("budget_0.0", 1024, 345, 5.5),
        {**row("mcbudget_0.5", 1024, 200, 4.6), "planned_peak_bytes": 196 * MIB},
        row("mcbudget_auto", 1024, 160, 5.0), unreachable, row("budget_0.1", 1024, None),
    ]


PLANE_MODES = ["eager", "checkpoint", "inductor", "budget_0.5", "budget_0.0", "budget_0.1",
               "mcbudget_0.5", "mcbudget_auto", "mcbudget_0.2"]


def test_has_plane_needs_two_budget_modes():
    assert bench.has_plane(PLANE_MODES)
    assert bench.has_plane(["budget_0.5", "mcbudget_auto"])
    assert not bench.has_plane(["eager", "checkpoint", "budget_0.5", "memcompile"])
    assert not bench.has_plane(["mcbudget_auto"])


def test_plane_table_sorted_by_peak_with_time_ratios():
    text = bench.render_plane_table(plane_rows(), 1024, modes=PLANE_MODES)
    assert text.splitlines()[0] == (
        "| mode | peak MiB | planned MiB | step s | time / checkpoint | note |")
    rows = table_rows(text)
    assert list(rows) == ["mcbudget_auto", "mcbudget_0.5", "budget_0.5", "inductor",
                          "budget_0.0", "checkpoint", "eager", "budget_0.1", "mcbudget_0.2"]
    assert rows["mcbudget_auto"] == ["160.0", "—", "5.00", "1.00", ""]
    assert rows["mcbudget_0.5"] == ["200.0", "196.0", "4.60", "0.92", ""]
    assert rows["budget_0.0"] == ["345.0", "—", "5.50", "1.10", ""]
    assert rows["eager"] == ["550.0", "—", "4.00", "0.80", ""]
    assert rows["budget_0.1"] == ["—", "—", "—", "—", "failed"]
    assert rows["mcbudget_0.2"] == ["—", "—", "—", "—",
                                    "budget unreachable (planner's least simulated peak 150.0 MiB)"]


def test_plane_points_series_and_missing_reference():
    rows = [r for r in plane_rows() if r["mode"] != "checkpoint"]
    points = {p["mode"]: p for p in bench.plane_points(rows, 1024)}
    assert points["budget_0.5"]["series"] == "torch"
    assert points["mcbudget_auto"]["series"] == "memcompile"
    assert points["eager"]["series"] == points["inductor"]["series"] == "single"
    assert points["eager"]["time_ratio"] is None  # no checkpoint row: no ratio
    assert bench.plane_points(rows, 1024, modes=["checkpoint"])[0]["note"] == "not run"


def test_markdown_has_plane_only_with_budget_sweeps():
    results = {"command": "memcompile bench --model small", "model": "small",
               "dtype": "float32", "batch_size": 1, "date": "2025-01-01T00:00:00+00:00",
               "repeat": 3, "seq_lens": [1024], "modes": PLANE_MODES, "rows": plane_rows()}
    text = render_markdown(results)
    assert "## Peak against step time" in text and "### Sequence length 1024" in text
    assert bench.render_plane_table(results["rows"], 1024, modes=PLANE_MODES) in text
    assert "`mcbudget_0.2` at 1024: budget unreachable" in text
    without = {**results, "modes": ["eager", "checkpoint", "budget_0.5"],
               "rows": [r for r in results["rows"]
                        if r["mode"] in ("eager", "checkpoint", "budget_0.5")]}
    assert "Peak against step time" not in render_markdown(without)


def test_plot_plane_writes_png(tmp_path):
    results = {"model": "small", "dtype": "float32", "seq_lens": [1024], "modes": PLANE_MODES,
               "rows": plane_rows()}
    assert bench.plot_plane(results, tmp_path / "plane.png")
    assert (tmp_path / "plane.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failed = {**results, "rows": [r for r in plane_rows() if not r["ok"]]}
    assert not bench.plot_plane(failed, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# ------------------------------------------------------------------------------- end to end


def test_end_to_end_tiny(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    argv = ["--model", "tiny", "--seq-lens", "32,64", "--modes", "eager,checkpoint,memcompile",
            "--options", '{"runtime":"eager"}', "--repeat", "1", "--out", str(out),
            # Two at a time keeps the test short; peaks do not depend on it.
            "--jobs", "2"]
    monkeypatch.setattr(sys, "argv", ["memcompile", "bench", *argv])
    assert bench.main(argv) == 0

    for name in ("results.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["argv"] == ["memcompile", "bench", *argv]
    assert results["command"].startswith("memcompile bench --model tiny --seq-lens 32,64")
    rows = results["rows"]
    assert [(r["mode"], r["seq_len"]) for r in rows] == [
        (m, s) for m in ("eager", "checkpoint", "memcompile") for s in (32, 64)
    ]
    for r in rows:
        assert r["ok"], r
        assert r["peak_bytes"] > 0 and r["baseline_bytes"] > 0
        assert r["method"] == "allocator" and r["device"] == "cpu"
        assert r["seconds"] > 0 and r["first_step_seconds"] > 0
    peaks = {(r["mode"], r["seq_len"]): r["peak_bytes"] for r in rows}
    assert peaks["eager", 64] > peaks["eager", 32]

    printed = capsys.readouterr().out
    assert "| `eager` |" in printed and "slope / checkpoint" in printed
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
