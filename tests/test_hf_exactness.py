"""Exactness on small Hugging Face causal LMs (Llama, Qwen2, GPT-2) built from configs.

docs/design.md, "Exactness, defined". float32: the worst relative error of the loss and every
gradient against a float64 twin (same weights, cast) is at most
``max(1.5 × eager float32's own error, 1e-6)``, in both runtimes. float64: at most 1e-10 against
float64 eager, in the eager runtime.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FLOAT64_TOL,
    clone_inputs,
    clone_model,
    compile_memcompile,
    float32_errors,
    float32_tolerance,
    inductor_graphs,
    train_step,
    worst_error,
)

from memcompile.config import Options
from memcompile.models import build_hf_model
from memcompile.report import recording

pytest.importorskip("transformers")

ARCHS = ("llama", "qwen2", "gpt2")
RUNTIMES = ("eager", pytest.param("inductor", marks=pytest.mark.slow))
"""Inductor's cold compile of these models takes 20-45 s on 2 cores."""
VOCAB = 256
"""The vocabulary of ``build_hf_model``'s test-sized defaults."""


def hf_batch(*, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` and ``labels`` (the model shifts them), some labels -100."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)
    labels = input_ids.clone()
    labels[:, -3:] = -100  # padding-like tail
    labels[torch.rand(batch_size, seq_len, generator=gen) < 0.2] = -100
    labels[0, 1] = 7  # at least one target counts
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_float32(arch, runtime):
    eager32 = build_hf_model(arch, dtype=torch.float32, seed=0)
    ref64 = clone_model(eager32, dtype=torch.float64)
    compiled = compile_memcompile(clone_model(eager32), runtime=runtime)
    (err, where), (eager_err, eager_where) = float32_errors(compiled, eager32, ref64, hf_batch())
    tol = float32_tolerance(eager_err)
    print(f"{arch}/{runtime} float32: memcompile {err:.3e} at {where}; "
          f"eager float32 {eager_err:.3e} at {eager_where}; tolerance {tol:.3e}")
    assert err <= tol, (
        f"worst relative error {err:.3e} at {where}, above {tol:.3e} "
        f"(eager float32's own error {eager_err:.3e} at {eager_where})"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_float64_eager_runtime(arch):
    model = build_hf_model(arch, dtype=torch.float64, seed=0)
    ref = clone_model(model)
    compiled = compile_memcompile(model, runtime="eager")
    batch = hf_batch(seed=1)
    loss = train_step(compiled, clone_inputs(batch))
    ref_loss = train_step(ref, clone_inputs(batch))
    err, where = worst_error(loss, ref_loss, compiled, ref)
    print(f"{arch}/eager float64: memcompile {err:.3e} at {where}")
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"


def test_hf_float64_default_runtime():
    """The default path, in CI: a Hugging Face model compiled with no options (Inductor), every
    parameter's gradient within 1e-10 of float64 eager. GPT-2 with one layer (~27 s cold on two cores): its
    LayerNorm computes in the model's dtype. The Llama family's RMSNorm computes in float32
    whatever the dtype, so under Inductor a float64 Llama is only float32-exact (1.5e-7 measured);
    the float32 rule covers those (``test_hf_float32``, slow under Inductor)."""
    assert Options().runtime == "inductor"
    model = build_hf_model("gpt2", dtype=torch.float64, seed=0, n_layer=1)
    ref = clone_model(model)
    torch._dynamo.utils.counters.clear()
    compiled = compile_memcompile(model)
    batch = hf_batch(seed=1)
    with recording() as records:
        loss = train_step(compiled, clone_inputs(batch))
    ref_loss = train_step(ref, clone_inputs(batch))
    err, where = worst_error(loss, ref_loss, compiled, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    # transformers breaks the graph before the loss: two training graphs, each compiled by
    # Inductor forward and backward.
    assert [r.kind for r in records] == ["training", "training"]
    assert inductor_graphs() == 4
