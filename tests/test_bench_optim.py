"""Smoke tests of the optimizer benchmarks (benchmarks/optim_memory.py, benchmarks/pretrain.py):
each program's main at a tiny size, and the structure of what it writes."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (benchmarks/ is a folder of programs, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------ optim_memory


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    om = load("optim_memory")
    out = tmp_path_factory.mktemp("optim_memory")
    # Eager runtime and in-process rows keep this to seconds; the real run uses Inductor and
    # a process per row.
    # One thread: steadier on a shared machine; main() restores the caller's count.
    code = om.main(["--preset", "tiny", "--config", "num_layers=1", "--seq-len", "32",
                    "--ranks", "16", "--modes", "adamw,galore,natural_galore,galore_fused",
                    "--runtime", "eager", "--repeat", "1", "--refresh-repeat", "1",
                    "--threads", "1", "--in-process", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "memory.json").read_text())


def test_optim_memory_json(memory_run):
    _, results = memory_run
    assert {"command", "config", "rows", "refresh", "seq_len", "torch_version"} <= set(results)
    rows = {r["mode"]: r for r in results["rows"]}
    assert list(rows) == ["adamw", "galore", "natural_galore", "galore_fused"]
    for mode in ("adamw", "galore", "natural_galore", "galore_fused"):
        r = rows[mode]
        assert r["ok"], r["error"]
        assert finite(r["peak_bytes"], r["baseline_bytes"], r["step_seconds"])
        assert r["peak_bytes"] > 0 and r["state_bytes_projected"] < r["state_bytes_total"]
    # The target at rank d/4 (hidden 64, rank 16): at least 65% less state than AdamW's
    # over the projected weights.
    assert rows["galore"]["state_bytes_projected"] <= 0.35 * rows["adamw"]["state_bytes_projected"]
    # Fused updates keep GaLore's state and free each projected gradient inside the backward:
    # a lower step peak than unfused GaLore's (0.38 against 0.43 MiB at this size).
    fused = rows["galore_fused"]
    assert fused["state_bytes_total"] == rows["galore"]["state_bytes_total"]
    assert fused["peak_bytes"] < rows["galore"]["peak_bytes"]
    (refresh,) = results["refresh"]
    assert refresh["ok"] and finite(refresh["exact_seconds"], refresh["randomized_seconds"])


def test_optim_memory_markdown(memory_run):
    out, results = memory_run
    text = (out / "memory.md").read_text()
    assert f"`{results['command']}`" in text.splitlines()[2]
    for mode in ("adamw", "galore", "natural_galore", "galore_fused"):
        assert f"| `{mode}` |" in text
    assert "| 16 | 7 |" in text  # the refresh row: rank 16, one tiny layer's 7 weights


def test_optim_memory_command_round_trips():
    om = load("optim_memory")
    args = om.build_parser().parse_args(["--preset", "tiny", "--config", "num_layers=1",
                                         "--ranks", "8,16", "--modes", "galore"])
    again = om.build_parser().parse_args(shlex.split(om.format_command(args))[2:])
    assert vars(again) == vars(args)


def test_optim_memory_worker_row_in_subprocess():
    """The fresh-process path: the row comes back as the worker's last stdout line."""
    om = load("optim_memory")
    spec = {"preset": "tiny", "config": {"num_layers": 1}, "mode": "galore_fused", "rank": 16,
            "seq_len": 16, "batch_size": 1, "runtime": "eager", "repeat": 1, "threads": 1}
    row = om.row_in_subprocess(spec, timeout=120)
    assert (row["mode"], row["rank"]) == ("galore_fused", 16)
    assert row["ok"], row["error"]
    assert finite(row["peak_bytes"], row["step_seconds"]) and row["peak_bytes"] > 0


# ---------------------------------------------------------------------------------- pretrain


def test_pretrain_smoke(tmp_path):
    pt = load("pretrain")
    code = pt.main(["--model", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                    "--eval-every", "2", "--table-every", "2", "--smooth", "2",
                    "--eval-windows", "4", "--train-bytes", "65536", "--eval-bytes", "8192",
                    "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "pretrain.json").read_text())
    assert {"command", "args", "data", "runs", "summary", "model_config"} <= set(results)
    runs = results["runs"]
    assert list(runs) == ["adamw", "galore", "natural_galore"]
    for r in runs.values():
        assert r["ok"]
        assert len(r["train_loss"]) == 4 and finite(*r["train_loss"])
        assert sorted(map(int, r["eval_loss"])) == [0, 2, 4] and finite(*r["eval_loss"].values())
        assert finite(r["step_seconds_median"], r["state_bytes_total"])
    # Same initial weights and batches: the first loss (before any update) is the same for all.
    assert len({r["train_loss"][0] for r in runs.values()}) == 1
    assert runs["galore"]["state_bytes_projected"] < runs["adamw"]["state_bytes_projected"]
    summary = results["summary"]
    assert finite(*summary["galore/adamw"].values(), *summary["natural_galore/galore"].values())
    text = (tmp_path / "pretrain.md").read_text()
    assert f"`{results['command']}`" in text.splitlines()[2]
    assert "| 2 |" in text and "| 4 |" in text
    assert (tmp_path / "pretrain.png").stat().st_size > 0


def test_pretrain_text_split_is_fixed():
    """Held-out bytes follow the training bytes; the offsets depend on the seed only."""
    pt = load("pretrain")
    train, held_out, info = pt.load_text(4096, 1024)
    assert (len(train), len(held_out)) == (4096, 1024) and int(train.max()) < 256
    assert info["sha256"] == pt.load_text(4096, 1024)[2]["sha256"]
    a = pt.batch_offsets(4096, 3, 2, 32, seed=0)
    assert a.equal(pt.batch_offsets(4096, 3, 2, 32, seed=0))
    assert int(a.max()) + 32 <= 4096
