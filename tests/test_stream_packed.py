"""StreamBP on packed sequences: several documents in one row, `position_ids` restarting at each.

transformers (cache off, as TRL sets it for packing) builds attention's mask as the causal rule
within documents, `(batch, 1, T, T)`. The `document_mask` pass hands attention the per-token ids
instead, and each streamed chunk builds its own rows from them: every layer streams, exactly,
and no value quadratic in the length exists in the step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import FLOAT64_TOL, assert_float32_rule, clone_inputs, clone_model, worst_error
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import memcompile
from memcompile.analysis.masks import DocumentMask, document_mask_part, find_document_mask
from memcompile.report import recording

transformers = pytest.importorskip("transformers")

aten = torch.ops.aten

ROWS = ([3, 13, 21], [5, 11, 21])
"""Document lengths of each row: 37 tokens, documents starting inside chunks of 8 and spanning
them; from token 16 on, both rows are in one document (chunks there need no mask)."""


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model.train()


def _packed(rows=ROWS) -> dict[str, torch.Tensor]:
    """Random tokens, with positions restarting at each document of each row."""
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    ids = torch.randint(0, 256, positions.shape, generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


@pytest.fixture
def float64_norm(monkeypatch):
    """Llama's RMSNorm in its input's dtype: transformers computes it in float32 whatever the
    model's dtype, which would put float32 roundoff into a float64 comparison."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden):
        scale = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (hidden * scale)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


@pytest.fixture
def attention_calls(monkeypatch):
    """How often chunks ran attention under their rows of a document mask ("masked") and
    under the causal rule alone ("causal")."""
    import memcompile.runtime.document_mask as runtime_masks

    calls = {"masked": 0, "causal": 0}

    def count(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(runtime_masks, "prefix_masked_attention",
                        count("masked", runtime_masks.prefix_masked_attention))
    monkeypatch.setattr(runtime_masks, "prefix_causal_attention",
                        count("causal", runtime_masks.prefix_causal_attention))
    return calls


def _loss(model, batch):
    return model(**batch).loss


def _float64_loss(model, batch):
    """Next-token cross entropy in the logits' dtype: transformers' loss computes in float32
    (it casts the logits with `.float()`), whose roundoff would show in a float64 comparison."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    following = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), following.flatten())


def _float64_error(model, batch, options: dict) -> float:
    """A streamed step's worst error against eager's, both with `_float64_loss`."""
    ref = clone_model(model)
    loss = _step(model, options, _float64_loss)(clone_inputs(batch))
    loss.backward()
    ref_loss = _float64_loss(ref, clone_inputs(batch))
    ref_loss.backward()
    err, where = worst_error(loss.detach(), ref_loss.detach(), model, ref)
    assert err <= FLOAT64_TOL, f"{err:.3e} at {where}"
    return err


def _step(model, options: dict, loss=_loss):
    torch._dynamo.reset()
    return torch.compile(lambda b: loss(model, b), backend="memcompile", options=options)


def _stream(chunk: int, **more) -> dict:
    return {"runtime": "eager", "stream": {"chunk_size": chunk, "logits_chunk_size": chunk},
            **more}


def _assert_streams_with_document_masks(records, model) -> None:
    (record,) = records
    assert record.kind == "stream"
    assert len(record.stream_plan.layers) == model.config.num_hidden_layers
    assert record.stream_plan.head is not None
    notes = [t for name, t in record.notes if name == "document_mask"]
    assert len(notes) == model.config.num_hidden_layers
    assert all("is the causal rule (pos[k] <= pos[q]) within documents" in t for t in notes)


@pytest.mark.parametrize("keys_values", ["once", "per_chunk"])
def test_a_packed_batch_streams_every_layer_exactly_in_float64(keys_values, float64_norm,
                                                               attention_calls):
    model = _model(torch.float64)
    options = _stream(8)
    options["stream"]["keys_values"] = keys_values
    with recording() as records, warnings.catch_warnings():
        warnings.simplefilter("error", memcompile.MemcompileWarning)
        _float64_error(model, _packed(), options)
    _assert_streams_with_document_masks(records, model)
    # Chunks inside one document skip the mask; those across documents build their rows.
    assert attention_calls["masked"] > 0 and attention_calls["causal"] > 0, attention_calls


def test_a_packed_batch_holds_the_float32_rule():
    eager32 = _model()
    ref64 = clone_model(eager32, dtype=torch.float64)
    model = clone_model(eager32)
    batch = _packed()
    step = _step(model, _stream(8))
    with recording() as records, warnings.catch_warnings():
        warnings.simplefilter("error", memcompile.MemcompileWarning)
        loss = step(clone_inputs(batch))
    loss.backward()
    _assert_streams_with_document_masks(records, model)
    assert_float32_rule(loss, model, eager32, ref64, batch, "packed")


class _Shapes(TorchDispatchMode):
    """The shapes of every tensor ops return while compiled code runs."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _shapes_of_a_step(model, batch, options) -> list[tuple[int, ...]]:
    """Every op output's shape in a streamed step's second call (forward and backward)."""
    step = _step(model, options)
    step(clone_inputs(batch)).backward()
    with _Shapes() as seen:
        step(clone_inputs(batch)).backward()
    return seen.shapes


def test_no_value_quadratic_in_the_length_exists_in_the_step():
    """At 100 tokens in chunks of 16, no op returns a tensor whose last two sizes are both at
    least the length (the whole mask is (2, 1, 100, 100)); a chunk's mask is at most 16 rows
    over the keys of its documents. Without the pass, the whole mask is built."""
    rows = ([30, 9, 41, 20], [55, 45])
    batch = _packed(rows)
    length = batch["input_ids"].shape[1]
    model = _model(torch.float64)

    def quadratic(shapes):
        return [s for s in shapes if len(s) >= 2 and min(s[-2:]) >= length]

    shapes = _shapes_of_a_step(model, batch, _stream(16))
    assert not quadratic(shapes), quadratic(shapes)[:5]
    masks = [s for s in shapes if len(s) == 4 and s[:2] == (2, 1) and s[-2] <= 16 < s[-1]]
    assert masks and max(s[-2] * s[-1] for s in masks) <= 16 * length
    model.zero_grad(set_to_none=True)
    whole = _shapes_of_a_step(model, batch, _stream(16, disable_passes=["document_mask"]))
    assert (2, 1, length, length) in quadratic(whole)


def test_one_document_per_row_takes_the_causal_kernel_without_a_mask(attention_calls,
                                                                   float64_norm):
    """position_ids that never restart: the same graph (transformers cannot tell while
    tracing), but every chunk lies in one document, so no chunk builds a mask."""
    model = _model(torch.float64)
    with recording() as records:
        _float64_error(model, _packed(([37], [37])), _stream(8))
    _assert_streams_with_document_masks(records, model)
    assert attention_calls["causal"] > 0 and attention_calls["masked"] == 0, attention_calls


def _packed_mask_graph(rule: str):
    """make_fx of transformers' packed mask for positions (2, 6): where(rule & same document,
    0, -inf), with the causal rule on positions, on indices, or a sliding window."""
    def mask_of(pos: torch.Tensor) -> torch.Tensor:
        batch, length = pos.shape
        starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
        doc = starts.cumsum(-1)
        b = torch.arange(batch)[:, None, None, None]
        q = torch.arange(length)[None, None, :, None]
        k = torch.arange(length)[None, None, None, :]
        if rule == "positions":
            causal = pos[b, k] <= pos[b, q]
        elif rule == "indices":
            causal = k <= q
        else:
            causal = (k <= q) & (q - k < 3)
        visible = torch.ones((), dtype=torch.bool) & causal & (doc[b, q] == doc[b, k])
        zero, hidden = torch.scalar_tensor(0.0), torch.scalar_tensor(float("-inf"))
        return torch.where(visible.expand(batch, 1, length, length), zero, hidden)

    gm = make_fx(mask_of, tracing_mode="fake")(torch.zeros(2, 6, dtype=torch.long))
    return gm, next(n for n in gm.graph.nodes if n.op == "output").args[0]


@pytest.mark.parametrize("rule", ["positions", "indices"])
def test_the_document_rule_is_read_off_the_graph_and_built_in_parts(rule):
    """Recognized on fake values; then, on real positions, the whole mask and any of its
    blocks built from the per-token ids equal the traced mask."""
    gm, mask = _packed_mask_graph(rule)
    found = find_document_mask(mask)
    assert isinstance(found, DocumentMask) and not found.keys
    assert (found.positions is not None) == (rule == "positions")
    assert [tuple(n.meta["val"].shape) for n in found.documents] == [(2, 1, 6, 1), (2, 1, 1, 6)]

    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    values = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    expected = Keep(gm).run(pos)
    args = torch.fx.node.map_arg(found.args(), values.__getitem__)
    whole = torch.ops.memcompile.document_mask(*args)
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    block = document_mask_part(*args, rows=(2, 5), columns=(1, 5))
    torch.testing.assert_close(block, expected[..., 2:5, 1:5], rtol=0, atol=0)


def test_a_window_within_documents_is_not_a_document_mask_and_says_why():
    _, mask = _packed_mask_graph("window")
    reason = find_document_mask(mask)
    assert isinstance(reason, str)
    assert "neither the causal rule, a comparison of per-token values" in reason


def test_document_ids_find_the_keys_a_chunk_sees_and_check_the_causal_rule():
    from memcompile.runtime.document_mask import DocumentIds

    def ids(documents, positions):
        d, p = torch.tensor(documents), torch.tensor(positions)
        return DocumentIds(d[:, None, :, None], d[:, None, None, :], p[:, None, :, None],
                           p[:, None, None, :], [], 0.0, float("-inf"), torch.float64)

    packed = ids([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]],
                 [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
    assert packed.causal
    assert packed.first_key(4, 8) == 0  # row 1's query 4 is still in its first document
    assert packed.first_key(6, 8) == 3 and packed.first_key(7, 8) == 5
    assert packed.one_document(3, 4, 7) is False  # row 1 changes document at 5
    assert ids([[0, 0, 0, 0]], [[0, 1, 2, 3]]).one_document(0, 2, 4)
    # Positions that fall within a document would let a query see a later key.
    assert not ids([[0, 0, 0, 0]], [[0, 2, 1, 3]]).causal


@pytest.mark.parametrize("kernel", ["cpu", "math"])
def test_chunk_attention_under_a_document_mask_equals_the_whole_kernel(monkeypatch, kernel):
    """Queries 6-10 of 16 under a document mask (documents 0-4, 5-11, 12-15), over keys 5-10
    only: output, log-sum-exp and gradients (keys' and values' into sinks, blocks of 2 keys)
    equal the kernel run over the whole length with the whole mask, in float64."""
    import memcompile.runtime.attention_kernels as attention_kernels
    import memcompile.runtime.chunk_attention as chunk_attention

    monkeypatch.setattr(chunk_attention, "key_block", lambda *a, **kw: 2)
    monkeypatch.setattr(attention_kernels, "kernel_kind", lambda q, k, op=None: kernel)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 16, 8, dtype=torch.float64, generator=gen).requires_grad_()
               for h in (4, 2, 2))
    doc = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    index = torch.arange(16)
    visible = (doc[:, None] == doc[None, :]) & (index[None, :] <= index[:, None])
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64).masked_fill(~visible, float("-inf"))
    full, full_lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                      attn_mask=mask)
    grad = torch.randn(full.shape, dtype=torch.float64, generator=gen)
    expected = torch.autograd.grad(full[:, :, 6:10], (q, k, v), grad[:, :, 6:10])
    sinks = (torch.zeros_like(k[:, :, 5:10]), torch.zeros_like(v[:, :, 5:10]))
    out, lse = chunk_attention.prefix_masked_attention(
        q[:, :, 6:10], k[:, :, 5:10], v[:, :, 5:10], mask[..., 6:10, 5:10], sinks=sinks)
    torch.testing.assert_close(out, full[:, :, 6:10], rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, full_lse[:, :, 6:10], rtol=0, atol=1e-13)
    (grad_q,) = torch.autograd.grad(out, q, grad[:, :, 6:10])
    torch.testing.assert_close(grad_q, expected[0], rtol=0, atol=1e-13)
    torch.testing.assert_close(sinks[0], expected[1][:, :, 5:10], rtol=0, atol=1e-13)
    torch.testing.assert_close(sinks[1], expected[2][:, :, 5:10], rtol=0, atol=1e-13)
    assert expected[1][:, :, :5].abs().max() == 0  # keys of the first document: no gradient


class _DocumentAttention(torch.nn.Module):
    """One attention layer and a loss, its mask written by hand from document ids and positions
    given as inputs (views, not transformers' gathers), `(2, 20)` tokens."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 64)

    def forward(self, ids, documents, positions):
        x = self.embed(ids)
        batch, length = ids.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 2, 16).permute(2, 0, 3, 1, 4)
        same = documents[:, None, :, None] == documents[:, None, None, :]
        before = positions[:, None, None, :] <= positions[:, None, :, None]
        zero = torch.scalar_tensor(0.0, dtype=x.dtype)
        mask = torch.where(same & before, zero, torch.scalar_tensor(float("-inf"), dtype=x.dtype))
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, 32))
        return torch.nn.functional.cross_entropy(self.head(x).flatten(0, 1), ids.flatten())


@pytest.mark.parametrize("within", ["increasing", "decreasing"])
def test_positions_that_do_not_increase_within_a_document_run_the_layer_whole(within, caplog):
    """Document ids and positions from the caller: where positions increase within each
    document the layer streams in chunks; where they decrease, queries see later keys, the
    layer runs whole (with a warning) and the step stays exact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _DocumentAttention().double()
    ref = clone_model(model)
    documents = torch.tensor([[0] * 7 + [1] * 13, [0] * 12 + [1] * 8])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row])
                             for row in ((7, 13), (12, 8))])
    if within == "decreasing":
        positions = positions.flip(-1)
        documents = documents.flip(-1)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    step = torch.compile(model, backend="memcompile", options=_stream(4))
    with recording() as records, caplog.at_level("WARNING"):
        loss = step(ids, documents, positions)
        loss.backward()
    ref_loss = ref(ids, documents, positions)
    ref_loss.backward()
    err, where = worst_error(loss.detach(), ref_loss.detach(), model, ref)
    assert err <= FLOAT64_TOL, f"{err:.3e} at {where}"
    (record,) = records
    assert record.kind == "stream" and len(record.stream_plan.layers) == 1
    assert any("within documents" in t for name, t in record.notes if name == "document_mask")
    whole = [r for r in caplog.records if "mask lets queries see later keys" in r.getMessage()]
    assert bool(whole) == (within == "decreasing")
