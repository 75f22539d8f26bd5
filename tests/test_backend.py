"""The backend by name: registration in fresh interpreters, options errors, unbuilt features."""

import subprocess
import sys
import textwrap

import pytest
import torch

import memcompile
from memcompile.backend import check_available

COMPILE_AND_RUN = """
m = torch.nn.Linear(8, 8)
x = torch.randn(4, 8)
cm = torch.compile(m, backend="memcompile", options={"runtime": "eager"})
cm(x).sum().backward()
assert m.weight.grad is not None
"""


def run_fresh(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter (nothing imported yet), returning the finished process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("prelude", [
    # torch finds the entry point and imports memcompile itself
    "import torch",
    # import memcompile first, then compile by name
    "import torch, memcompile",
    # torch has read the entry points before memcompile is imported: no duplicate registration
    "import torch; torch._dynamo.list_backends(); import memcompile",
    # memcompile registered first, then torch reads the entry points
    "import torch, memcompile; torch._dynamo.list_backends()",
])
def test_backend_by_name_in_a_fresh_interpreter(prelude):
    result = run_fresh(prelude + "\n" + COMPILE_AND_RUN + "\nprint('ok')")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_entry_point_is_listed():
    result = run_fresh("import torch; print('memcompile' in torch._dynamo.list_backends())")
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def test_bad_option_names_the_key_at_first_call():
    m = torch.nn.Linear(4, 4)
    cm = torch.compile(m, backend="memcompile", options={"memory_budgt": 0.5})
    with pytest.raises(Exception) as e:
        cm(torch.randn(2, 4))
    message = str(e.value)
    assert "OptionsError: memcompile option 'memory_budgt': unknown option" in message
    assert "valid options: memory_budget, stream" in message


@pytest.mark.parametrize("options", [{"sequence_parallel": True}, {"sequence_parallel": {}}])
def test_sequence_parallel_without_torch_distributed_is_refused_clearly(options):
    with pytest.raises(memcompile.OptionsError, match="needs torch.distributed initialized"):
        check_available(memcompile.Options(**options))


def test_auto_defaults_are_accepted():
    check_available(memcompile.Options())
    check_available(memcompile.Options(memory_budget=None, stream=False))
