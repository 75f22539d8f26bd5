"""The `memcompile` command: explain and demo on the tiny preset, and its argument errors."""

import pytest

from helpers import FLOAT64_TOL
from memcompile.cli import main


def test_explain_prints_the_report(capsys):
    assert main(["explain", "--model", "tiny", "--seq-len", "16",
                 "--options", '{"runtime": "eager"}']) == 0
    out = capsys.readouterr().out
    assert out.startswith("# built-in 'tiny' model (2 layers, hidden 64, vocabulary 256)")
    assert "memcompile report: 1 graph(s), runtime=eager" in out
    assert "measured allocator" in out and "tracked" in out


def test_demo_trains_and_writes_the_report(capsys, tmp_path):
    """In float64, so the gradient column is held to the design's 1e-10 (a float32 run has no
    float64 twin to derive its bound from; a fixed 1e-5 there followed no rule)."""
    out_dir = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--seq-len", "16", "--steps", "2",
                 "--dtype", "float64", "--options", '{"runtime": "eager"}',
                 "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    step_rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[0] for row in step_rows] == ["1", "2"]
    assert all(float(row[3]) <= FLOAT64_TOL for row in step_rows)  # worst relative grad error
    assert any(line.startswith("eager") and "MiB" in line for line in lines)
    assert any(line.startswith("memcompile") and "MiB" in line for line in lines)
    assert (out_dir / "report.txt").read_text().startswith("memcompile report")
    assert (out_dir / "memory.png").stat().st_size > 0


@pytest.mark.parametrize("argv,fragment", [
    (["explain", "--model", "huge"], "invalid choice: 'huge'"),
    (["explain", "--seq-len", "0"], "0 is not positive"),
    (["explain", "--options", "{runtime}"], "--options is not valid JSON"),
    (["explain", "--options", '{"runtime": "jax"}'], "'runtime': got 'jax'; valid: inductor, eager"),
])
def test_bad_arguments_say_what_is_valid(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert fragment in capsys.readouterr().err
