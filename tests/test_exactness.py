"""Exactness of memcompile's training step against eager PyTorch, in float64.

docs/design.md, "Exactness, defined": the loss and every parameter gradient within 1e-10 relative
(``‖g − g_ref‖ / ‖g_ref‖``) of float64 eager. Hypothesis draws random small MLPs and Llama
configurations (eager runtime); fixed examples cover dynamic shapes, graph breaks, inputs with
and without grad, ``torch.no_grad()``, ``torch.utils.checkpoint`` and BatchNorm's running
statistics in both runtimes. Test models avoid gradients that are mathematically zero (see
``helpers.relative_error``).
"""

from __future__ import annotations


import pytest
import torch
import torch._dynamo
from helpers import (
    ACTIVATIONS,
    FLOAT64_TOL,
    LOSSES,
    MLPStack,
    WithLoss,
    clone_inputs,
    clone_model,
    compile_memcompile,
    compiled_and_reference,
    inductor_graphs,
    relative_error,
    seeded,
    train_step,
    worst_error,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from memcompile.models import LlamaConfig, build_model, make_batch
from memcompile.report import recording

RUNTIMES = ("eager", "inductor")
RUNTIMES_SLOW_INDUCTOR = ("eager", pytest.param("inductor", marks=pytest.mark.slow))
"""For Llama examples whose cold Inductor compile takes 30-80 s on 2 cores."""

PROPERTY_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def assert_step_exact(compiled: nn.Module, ref: nn.Module, inputs, *, tol: float = FLOAT64_TOL,
                      grad_inputs: tuple[str, ...] = ()) -> float:
    """One step of ``compiled`` and of ``ref`` on copies of ``inputs``; assert all errors ≤ tol.

    ``grad_inputs`` names entries of the ``inputs`` dict that require grad: their ``.grad`` is
    compared too. Returns the worst error.
    """
    mine, theirs = clone_inputs(inputs), clone_inputs(inputs)
    loss = train_step(compiled, mine)
    ref_loss = train_step(ref, theirs)
    err, where = worst_error(loss, ref_loss, compiled, ref)
    for key in grad_inputs:
        assert mine[key].grad is not None and theirs[key].grad is not None, key
        input_err = relative_error(mine[key].grad, theirs[key].grad)
        if input_err > err:
            err, where = input_err, f"input {key!r}"
    assert err <= tol, f"worst relative error {err:.3e} at {where} (tolerance {tol:.0e})"
    return err


# --- hypothesis: random models, eager runtime, float64 -------------------------------------


@st.composite
def mlp_cases(draw):
    """A random :class:`MLPStack` with a loss, and inputs ``dict(x, target)``."""
    depth = draw(st.integers(1, 4))
    layer_norm, residual = draw(st.booleans()), draw(st.booleans())
    # LayerNorm over one feature outputs its bias: its weight's gradient is mathematically 0,
    # so eager's is pure roundoff (~1e-15) and any relative error against it is meaningless.
    width = st.integers(2 if layer_norm else 1, 24)
    widths = draw(st.lists(width, min_size=depth + 1, max_size=depth + 1))
    activations = draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=depth, max_size=depth))
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2)))
    loss = draw(st.sampled_from(LOSSES))
    input_grad = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))

    gen = torch.Generator().manual_seed(seed)
    model = seeded(lambda: WithLoss(MLPStack(widths, activations, layer_norm=layer_norm,
                                             residual=residual), loss), seed)
    x = torch.randn(*lead, widths[0], generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        target = torch.randint(0, widths[-1], lead, generator=gen)
    else:
        target = torch.randn(*lead, widths[-1], generator=gen, dtype=torch.float64)
    return model, {"x": x.requires_grad_(input_grad), "target": target}


@settings(PROPERTY_SETTINGS, max_examples=20)
@given(mlp_cases())
def test_random_mlp_eager_runtime_float64(case):
    model, inputs = case
    ref = clone_model(model)
    compiled = compile_memcompile(model, dynamic=False, runtime="eager")
    assert_step_exact(compiled, ref, inputs,
                      grad_inputs=("x",) if inputs["x"].requires_grad else ())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def llama_cases(draw):
    """A random small Llama and a batch whose labels ignore (-100) some positions."""
    num_heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([d for d in range(2, 33, 2) if 8 <= num_heads * d <= 32]))
    config = LlamaConfig(
        vocab_size=draw(st.integers(16, 64)),
        hidden_size=num_heads * head_dim,
        intermediate_size=draw(st.integers(4, 48)),
        num_layers=draw(st.integers(1, 2)),
        num_heads=num_heads,
        num_kv_heads=draw(st.sampled_from(_divisors(num_heads))),
        tie_embeddings=draw(st.booleans()),
    )
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(2, 24))
    ignore_fraction = draw(st.sampled_from([0.0, 0.25, 0.75]))
    seed = draw(st.integers(0, 2**31 - 1))

    model = build_model(config, dtype=torch.float64, seed=seed)
    if draw(st.booleans()):
        model.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    labels = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_fraction] = config.ignore_index
    labels[0, 1] = 0  # at least one target counts, or the mean loss is 0/0
    return model, {"input_ids": input_ids, "labels": labels}


@settings(PROPERTY_SETTINGS, max_examples=6)
@given(llama_cases())
def test_random_llama_eager_runtime_float64(case):
    model, batch = case
    ref = clone_model(model)
    compiled = compile_memcompile(model, dynamic=False, runtime="eager")
    assert_step_exact(compiled, ref, batch)


# --- fixed examples, both runtimes, float64 ------------------------------------------------


def small_llama_config(**overrides) -> LlamaConfig:
    """A Llama smaller than the tiny preset, for examples that need no particular size."""
    sizes = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=2,
                 num_heads=2, num_kv_heads=1)
    return LlamaConfig(**{**sizes, **overrides})


def small_mlp(seed: int = 0) -> WithLoss:
    """A float64 two-block MLP with LayerNorm and residuals, under an MSE loss."""
    return seeded(lambda: WithLoss(MLPStack([6, 12, 5], ["gelu", "tanh"], layer_norm=True,
                                            residual=True)), seed)


def mlp_inputs(*, input_grad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """``dict(x, target)`` for :func:`small_mlp`, batch 4."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_(input_grad)
    return {"x": x, "target": torch.randn(4, 5, generator=gen, dtype=torch.float64)}


@pytest.mark.parametrize("runtime", RUNTIMES_SLOW_INDUCTOR)
def test_tiny_preset_two_seq_lens_dynamic(runtime):
    model = build_model("tiny", dtype=torch.float64)
    ref = clone_model(model)
    compiled = compile_memcompile(model, runtime=runtime)
    with recording() as records:
        assert_step_exact(compiled, ref, make_batch("tiny", batch_size=2, seq_len=8, seed=1))
        assert_step_exact(compiled, ref, make_batch("tiny", batch_size=2, seq_len=13, seed=2))
    assert records, "a new length compiles again (then with a dynamic length)"
    with recording() as records:
        assert_step_exact(compiled, ref, make_batch("tiny", batch_size=2, seq_len=5, seed=3))
    assert records == [], "a third length reuses the dynamic graph"


class TokenAttention(nn.Module):
    """Embedding, one causal self-attention head with a residual, tanh, a linear head and the
    mean cross-entropy: the least that has a sequence length in attention and the loss."""

    def __init__(self, vocab: int = 32, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the head's logits at every position against ``labels``."""
        h = self.embed(ids)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        logits = self.head(torch.tanh(attended.squeeze(1) + h))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def token_batch(seq_len: int, *, vocab: int = 32) -> dict[str, torch.Tensor]:
    """``dict(ids, labels)`` of batch 2 and length ``seq_len``, seeded by the length."""
    gen = torch.Generator().manual_seed(seq_len)
    return {"ids": torch.randint(0, vocab, (2, seq_len), generator=gen),
            "labels": torch.randint(0, vocab, (2, seq_len), generator=gen)}


def test_two_seq_lens_dynamic_default_runtime():
    """The default runtime (Inductor, no options) under dynamic shapes, in CI (~23 s cold on two cores): a second
    length recompiles with a symbolic length, a third reuses that graph, and each step's
    gradients are within 1e-10 of float64 eager. The tiny preset's version is slow."""
    model = seeded(TokenAttention)
    ref = clone_model(model)
    compiled = compile_memcompile(model)
    torch._dynamo.utils.counters.clear()
    with recording() as records:
        assert_step_exact(compiled, ref, token_batch(8))
        assert_step_exact(compiled, ref, token_batch(13))
    assert [r.kind for r in records] == ["training", "training"], "a new length compiles again"
    assert inductor_graphs() == 4
    with recording() as records:
        assert_step_exact(compiled, ref, token_batch(5))
    assert records == [], "a third length reuses the dynamic graph"


class GraphBreakModel(nn.Module):
    """Two MLP halves with a Dynamo graph break between them, and an MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        self.first = MLPStack([6, 10], ["silu"], layer_norm=True)
        self.second = MLPStack([10, 10, 5], ["relu", "tanh"], residual=True)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``second(first(x))`` against ``target``, captured as two graphs."""
        h = self.first(x)
        torch._dynamo.graph_break()
        return (self.second(h) - target).pow(2).mean()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_graph_break(runtime):
    model = seeded(GraphBreakModel)
    compiled, ref = compiled_and_reference(model, runtime=runtime)
    with recording() as records:
        assert_step_exact(compiled, ref, mlp_inputs(input_grad=False))
    assert len(records) == 2, "one graph before the break, one after"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_input_without_grad(runtime):
    model = small_mlp()
    ref = clone_model(model)
    compiled = compile_memcompile(model, runtime=runtime)
    inputs = mlp_inputs(input_grad=False)
    assert_step_exact(compiled, ref, inputs)
    x = clone_inputs(inputs)["x"]
    train_step(compiled, {"x": x, "target": inputs["target"]})
    assert x.grad is None


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_input_requires_grad(runtime):
    model = small_mlp()
    ref = clone_model(model)
    compiled = compile_memcompile(model, runtime=runtime)
    assert_step_exact(compiled, ref, mlp_inputs(input_grad=True), grad_inputs=("x",))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_no_grad_call(runtime):
    model = build_model(small_llama_config(), dtype=torch.float64)
    compiled = compile_memcompile(model, runtime=runtime)
    input_ids = make_batch(small_llama_config(), batch_size=2, seq_len=7)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids).logits
        with recording() as records:
            logits = compiled(input_ids).logits
    assert [r.kind for r in records] == ["inference"]
    assert not logits.requires_grad
    assert relative_error(logits, expected) <= FLOAT64_TOL
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("runtime", RUNTIMES_SLOW_INDUCTOR)
def test_checkpointed_layers(runtime):
    model = build_model(small_llama_config(), dtype=torch.float64)
    model.enable_gradient_checkpointing()
    ref = clone_model(model)
    compiled = compile_memcompile(model, runtime=runtime)
    batch = make_batch(small_llama_config(), batch_size=2, seq_len=9)
    batch["labels"][:, ::3] = -100
    assert_step_exact(compiled, ref, batch)


class CheckpointedMLP(nn.Module):
    """An MLP whose middle block runs under ``torch.utils.checkpoint``, with an MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MLPStack([6, 12, 12, 5], ["gelu", "silu", "tanh"], layer_norm=True,
                              residual=True)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE of the checkpointed stack's output against ``target``."""
        out = checkpoint(self.inner, x, use_reentrant=False)
        return (out - target).pow(2).mean()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_checkpoint_with_input_grad(runtime):
    model = seeded(CheckpointedMLP)
    compiled, ref = compiled_and_reference(model, runtime=runtime)
    assert_step_exact(compiled, ref, mlp_inputs(input_grad=True), grad_inputs=("x",))


class BatchNormModel(nn.Module):
    """Linear, BatchNorm (running statistics mutated in the step), tanh, a squared loss.

    The Linear has no bias: BatchNorm subtracts the batch mean, so that bias's gradient would be
    mathematically 0 and eager's roundoff in it no reference at all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 6, bias=False)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``tanh(norm(linear(x)))²``."""
        return self.norm(self.linear(x)).tanh().pow(2).mean()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_batchnorm_running_stats(runtime):
    model = seeded(BatchNormModel)
    compiled, ref = compiled_and_reference(model, runtime=runtime)
    for seed in (0, 1):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert_step_exact(compiled, ref, (x,))
    for name, buffer in ref.named_buffers():
        assert relative_error(model.get_buffer(name), buffer) <= FLOAT64_TOL, name
