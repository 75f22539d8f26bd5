"""The worker: one (mode, sequence length) configuration, measured in its own fresh process.

`python -m memcompile.bench --worker SPEC` runs `worker_main`, which prints the result row as
the last line of stdout, a JSON object (``ok`` False, with the error, on any failure). A memcompile
budget below the least peak its planner reaches is a failed row with ``status`` "budget
unreachable" and that least peak (``least_peak_bytes``, the planner's simulated bytes).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from memcompile.bench.args import budget_of, mc_budget_options, stream_options_of
from memcompile.errors import MemoryBudgetError

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
BUDGET_UNREACHABLE = "budget unreachable"


def _build(model_spec: Mapping[str, Any], dtype: Any, device: str) -> tuple[Any, int]:
    """The model in training mode, and its vocabulary size."""
    from memcompile.models import build_hf_model, build_model

    if model_spec["kind"] == "preset":
        model = build_model(model_spec["name"], dtype=dtype, seed=DEFAULT_SEED, device=device)
        vocab = model.config.vocab_size
    else:
        model = build_hf_model(model_spec["arch"], dtype=dtype, seed=DEFAULT_SEED,
                               **model_spec["overrides"]).to(device)
        vocab = model.config.vocab_size
    return model.train(), vocab


def _batch(vocab: int, batch_size: int, seq_len: int, device: str) -> dict[str, Any]:
    """Random token ids from a fixed seed; labels are a copy (the models shift them)."""
    import torch

    generator = torch.Generator().manual_seed(DEFAULT_SEED)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _enable_checkpointing(model: Any) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # memcompile.models.LlamaForCausalLM
        model.enable_gradient_checkpointing()
    else:  # Hugging Face
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _wrap(model: Any, mode: str, options: Mapping[str, Any]) -> Any:
    """What the step calls for `mode`: the module itself or a compiled module."""
    import torch

    if mode == "eager":
        return model
    if mode == "checkpoint":
        _enable_checkpointing(model)
        return model
    stream = stream_options_of(mode)
    budget_options = mc_budget_options(mode)
    if stream is not None or budget_options is not None or mode == "memcompile":
        import memcompile  # noqa: F401  (registers the backend)
    if stream is not None:
        # StreamBP chunks the loss head only when the compiled function returns the loss alone
        # (a model's logits output would have to exist whole): the usual loop reads only it.
        given = options.get("stream")
        stream = {**(given if isinstance(given, Mapping) else {}), **stream}
        loss = torch.compile(lambda **batch: model(**batch).loss, backend="memcompile",
                             options={**options, "stream": stream or True})
        return lambda **batch: _LossOnly(loss(**batch))
    if mode == "memcompile" or budget_options is not None:
        return torch.compile(model, backend="memcompile",
                             options={**options, **(budget_options or {})})
    # "inductor" and "budget_<f>": torch.compile's defaults (the budget is patched by the caller)
    return torch.compile(model)


class _LossOnly:
    """A step's output holding only the loss (what `step` reads)."""

    def __init__(self, loss: Any):
        self.loss = loss


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def run_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Build, wrap and measure one (mode, seq_len) configuration; return its result row.

    Raises on any failure; `worker_main` turns that into a failed row.
    """
    import contextlib

    import torch

    import memcompile
    from memcompile.measure import wall_seconds
    from memcompile.measure_calls import count_calls, kernel_profile
    from memcompile.report import recording

    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec["dtype"])
    mode = spec["mode"]
    budget = budget_of(mode)
    patch = (torch._functorch.config.patch(activation_memory_budget=budget)
             if budget is not None else contextlib.nullcontext())
    torch.manual_seed(DEFAULT_SEED)
    # kernel_profile: Inductor's CPU kernels record themselves, so the call count sees them.
    with patch, kernel_profile():
        model, vocab = _build(spec["model"], dtype, device)
        batch = _batch(vocab, spec["batch_size"], spec["seq_len"], device)
        wrapped = _wrap(model, mode, spec.get("options") or {})

        def step() -> None:
            wrapped(**batch).loss.backward()
            # Every step starts as the first did: weights live, no gradients.
            model.zero_grad(set_to_none=True)

        # The first step compiles; timed on its own so compilation stays out of the median.
        with recording() as records:
            first_seconds = wall_seconds(step, cuda=device == "cuda")
        method = "cuda" if device == "cuda" else "allocator"
        # One more warm-up inside measure: some runtimes settle (caches, lazy init) on step two.
        result = memcompile.measure(step, warmup=1, repeat=spec["repeat"], method=method)
        calls = count_calls(step, device=device)
    plans = [r.plan for r in records if r.plan is not None]
    return {
        "peak_bytes": result.peak_bytes,
        # memcompile's planned peak beside the measured one (one training graph: comparable)
        "planned_peak_bytes": plans[0].chosen_peak if len(plans) == 1 else None,
        "baseline_bytes": result.baseline_bytes,
        "seconds": result.seconds,
        "first_step_seconds": first_seconds,
        "method": result.method,
        # one more step's calls: aten events + Inductor kernels (CPU), kernel launches (CUDA)
        "calls": calls.calls,
        "aten_calls": calls.aten,
        "kernel_calls": calls.kernels,
        "top_calls": calls.top(12),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "torch_version": torch.__version__,
        "device": device,
        "device_name": _device_name(device),
    }


def worker_main(spec_json: str) -> int:
    """Entry of `python -m memcompile.bench --worker SPEC`: print one JSON line with the row."""
    spec = json.loads(spec_json)
    row: dict[str, Any] = {"mode": spec["mode"], "seq_len": spec["seq_len"]}
    try:
        row.update(run_worker(spec), ok=True, error=None)
        code = 0
    except BaseException as e:  # noqa: BLE001  (an OOM or any failure is a failed row)
        if isinstance(e, KeyboardInterrupt):
            raise
        unreachable = budget_error_of(e)
        if unreachable is not None:
            # The user's budget, not a crash: one line, and the least peak the planner reaches.
            log.warning("configuration %s at %d: %s", spec["mode"], spec["seq_len"], unreachable)
            row.update(ok=False, status=BUDGET_UNREACHABLE,
                       least_peak_bytes=unreachable.least_peak_bytes,
                       budget_bytes=unreachable.budget_bytes,
                       error=f"{BUDGET_UNREACHABLE}: {_error_text(unreachable)}")
        else:
            log.exception("configuration %s at %d failed", spec["mode"], spec["seq_len"])
            row.update(ok=False, error=_error_text(e))
        code = 1
    sys.stdout.write("\n" + json.dumps(row) + "\n")
    sys.stdout.flush()
    return code


def budget_error_of(error: BaseException) -> MemoryBudgetError | None:
    """The `MemoryBudgetError` behind `error`, or None.

    Dynamo raises what a backend raises as `BackendCompilerFailed` (``from None``, keeping it as
    ``inner_exception`` and ``__context__``), so the chain is walked rather than the type checked.
    """
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, MemoryBudgetError):
            return current
        todo += [current.__cause__, current.__context__, getattr(current, "inner_exception", None)]
    return None


def _error_text(error: BaseException) -> str:
    """The error's type and first lines: Dynamo wraps backend errors in long messages."""
    lines = str(error).strip().splitlines()
    text = " | ".join(line.strip() for line in lines[:4] if line.strip())
    return f"{type(error).__name__}: {text}"[:1000]
