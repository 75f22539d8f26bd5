"""A real `transformers.Trainer` run with memcompile, in the documented recipe:

    model.config.use_cache = False
    model.compile(backend="memcompile", options={"stream": ...})
    Trainer(model=model, args=TrainingArguments(...), ...).train()

Four optimizer steps on a Hugging Face Llama from its default config (sizes changed), plain,
with the Trainer's `gradient_checkpointing=True`, and with bf16 autocast: one graph, every layer
and the loss head streamed, no warning, and the logged losses held to the design's float32 rule
against the same run of eager float64 (bf16: to bf16's unit roundoff).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import float32_tolerance
import memcompile
from memcompile.report import recording

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STREAM = {"stream": {"chunk_size": 8, "logits_chunk_size": 8}}
LAYERS = 2


def _model(dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2)
    config.use_cache = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).to(dtype)


def _data() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (24,), generator=generator) for _ in range(8)]
    return [{"input_ids": ids, "labels": ids} for ids in rows]


def _losses(tmp_path, *, compiled: bool, dtype=torch.float32, **args) -> tuple[list[float], list]:
    """The logged loss of each of 4 steps, and the compile records."""
    model = _model(dtype)
    if compiled:
        torch._dynamo.reset()
        model.compile(backend="memcompile", options=STREAM)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, **args)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_data())
    with recording() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if issubclass(w.category, memcompile.MemcompileWarning)]
    assert not said, said
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], records


@pytest.mark.parametrize("args", [{}, {"gradient_checkpointing": True}, {"bf16": True}],
                         ids=["plain", "gradient_checkpointing", "bf16"])
def test_trainer_streams_layers_and_head_and_trains_as_eager(tmp_path, args):
    losses, records = _losses(tmp_path, compiled=True, **args)
    (record,) = records
    assert record.kind == "stream"
    assert len(record.stream_plan.layers) == LAYERS
    assert record.stream_plan.head is not None
    assert record.stream_plan.head.sequence_outputs  # the logits, returned to the Trainer
    eager, _ = _losses(tmp_path, compiled=False, **args)
    exact, _ = _losses(tmp_path, compiled=False, dtype=torch.float64,
                       **{k: v for k, v in args.items() if k != "bf16"})
    assert len(losses) == len(eager) == len(exact) == 4
    eager_error = max(abs(e - t) / abs(t) for e, t in zip(eager, exact))
    # bf16's unit roundoff (2**-8) bounds a bf16 loss's error; one step's eager error can be
    # far below it by chance (measured: 2.6e-7 at one step, 2.6e-5 at another).
    allowed = max(float32_tolerance(eager_error), 2.0**-8 if args.get("bf16") else 0.0)
    for step, (ours, truth) in enumerate(zip(losses, exact)):
        assert abs(ours - truth) / abs(truth) <= allowed, (step, losses, eager, exact)
