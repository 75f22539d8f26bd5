"""Inductor's caches never skip memcompile: the passes run in every process.

AOTAutograd's cache would hand back the forward and backward without calling memcompile's
partitioner; the Inductor runtime turns it off. When a user forces it on
(TORCHINDUCTOR_AUTOGRAD_CACHE=1), the cache key holds memcompile's code and options, and a hit
is recorded as "cached" with a note.
"""

import os
import subprocess
import sys

import pytest

STEP = """
import json, sys, torch
from torch import nn
from memcompile.report import recording
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
cm = torch.compile(m, backend="memcompile", options=json.loads(sys.argv[1]))
with recording() as records:
    cm(torch.randn(2, 3)).sum().backward()
print([(r.kind, r.forward is not None) for r in records])
"""


def run_step(cache_dir, options="{}", **env):
    """One training step in a fresh interpreter with its own Inductor cache directory."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), **env}
    result = subprocess.run([sys.executable, "-c", STEP, options], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_warm_cache_in_a_new_process_still_runs_the_passes(tmp_path):
    runs = [run_step(tmp_path) for _ in range(2)]
    assert runs == ["[('training', True)]"] * 2


@pytest.mark.slow
def test_a_forced_autograd_cache_is_keyed_on_the_options_and_reported(tmp_path):
    forced = {"TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    assert run_step(tmp_path, **forced) == "[('training', True)]"
    assert run_step(tmp_path, **forced) == "[('cached', False)]"
    # other options, another key: memcompile runs again
    assert run_step(tmp_path, '{"passes": []}', **forced) == "[('training', True)]"
