"""`memcompile.Options`: every option of the backend, typed, frozen and validated in one place.

torch hands a backend its `options` only at the first call of the compiled function, so the
backend calls `Options.from_mapping(options)` then; users may build `Options(**d)` earlier to
validate up front. Either way an unknown key or a bad value raises `OptionsError` naming the key
and listing what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from memcompile.errors import OptionsError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_BUDGET_VALID = (
    '"auto", None, a float in (0, 1] (a fraction of the save-everything peak), '
    'an int of at least 1 MiB of bytes, or a string such as "1.5GiB"'
)
_LEAST_INT_BUDGET = 2**20
"""The smallest int budget: below it an int is refused as the fraction trap (1 against 1.0)."""
RUNTIMES = ("inductor", "eager")
STREAM_DIMS = ("sequence", "batch")
STREAM_KEYS_VALUES = ("once", "per_chunk")
SP_LAYOUTS = ("zigzag", "contiguous")
SP_SCHEDULES = {"balanced": "zigzag", "ring": "contiguous"}
"""`sequence_parallel.schedule`, the design's name for the layout: the balanced schedule runs
on zigzag shards, the plain ring on contiguous ones."""
SP_KEYS = ("group", "layout", "schedule", "timeout")
_OFFLOAD_VALID = ('False, True, or a dict of "bandwidth" (bytes per second, a positive number, '
                  'or "measured") and "on_cpu" (a bool)')


def parse_bytes(text: str) -> int:
    """Parse a byte count such as ``"1.5GiB"``, ``"800MB"`` or ``"4096"`` into an int."""
    match = _BYTES_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(
            f"{text!r} is not a byte count; write a number and one of the units "
            f"{', '.join(u for u in _BYTE_UNITS if u)} (for example '1.5GiB')"
        )
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """StreamBP chunking, normalized from `True` or a dict."""

    chunk_size: int | Literal["auto"] = "auto"
    """Tokens per chunk when re-running a layer in the backward. "auto": the longest chunk
    whose values stay within a quarter of the held layer inputs' bytes, at least 1,024 tokens;
    under a numeric `memory_budget`, the fewest chunks that meet it with the most inputs held
    (`memcompile.planning.stream_chunks`)."""
    logits_chunk_size: int | Literal["auto"] = "auto"
    """Tokens per chunk of the LM head and loss; "auto" sizes it."""
    dim: Literal["sequence", "batch"] = "sequence"
    """The dimension chunked: the sequence, or the batch for a batch-coupled loss."""
    layers_per_checkpoint: int = 1
    """Consecutive layers that share one saved input: 1 saves every layer's input; `g` saves
    every `g`-th and re-runs the forward of the others in the backward (fewer whole-length
    buffers, up to one more forward of compute)."""
    checkpoints: int | Literal["auto"] = "auto"
    """The most layer inputs a run of layers holds at once; the backward recomputes the others
    from the nearest held one, with the fewest layer forwards (a "revolve" schedule). "auto":
    every input, or as few as a numeric `memory_budget` needs. At least 2 (1 for one layer)."""
    keys_values: Literal["once", "per_chunk"] = "once"
    """How a layer's backward gets attention's keys and values: "once" computes them over the
    whole length and sums their gradients across chunks; "per_chunk" recomputes them over each
    chunk's prefix (no whole-length key/value buffers, more recompute)."""
    keep_attention: bool = False
    """Keep each held layer's attention output and log-sum-exp from the forward pass, so its
    backward chunks skip the attention forward (about a third of attention's work, most of a
    layer's at long lengths) for one more hidden state per held layer
    (`runtime.kept_attention`). Needs keys_values "once" and causal attention on a fused
    kernel; elsewhere a warning says why it is not applied."""


@dataclass(frozen=True, kw_only=True)
class SequenceParallelOptions:
    """Attention across the ranks of a torch.distributed group, normalized from `True` or a
    dict. Each rank holds its shard of the sequence (`memcompile.distributed.shard_batch`)."""

    group: Any = None
    """The process group whose ranks share the sequence; None: the default group. Gradients
    of the weights are summed over it (data parallelism runs over another group)."""
    layout: Literal["zigzag", "contiguous"] = "zigzag"
    """How the sequence is cut: "zigzag" (two chunks per rank, balanced causal work; the
    schedule "balanced") or "contiguous" (one chunk per rank, the plain ring; "ring"). The
    batch must be sharded with the same layout."""
    timeout: float = 300.0
    """Seconds a rank waits on a peer's transfer before `PeerError` names the peer."""


@dataclass(frozen=True, kw_only=True)
class OffloadOptions:
    """Offload to host memory (`planning.offload`), normalized from `True` or a dict."""

    bandwidth: float | Literal["measured"] = "measured"
    """Host-device bytes per second the planner prices a transfer with; "measured": one copy
    each way timed once per process on the graph's device (`analysis.cost.transfer_bandwidth`)."""
    on_cpu: bool = False
    """Plan a CPU graph as if the CPU were the device: the values offloaded go to a separate
    CPU buffer (a plain copy) and come back, and the peak counts the CPU bytes freed while a
    value is away. There is no separate host memory on a CPU, so this saves nothing; it is
    there to test the mechanics and the accounting without a GPU."""


class _RejectUnknownKeys(type):
    """Metaclass that turns an unknown keyword into an `OptionsError` listing the valid ones."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise OptionsError("<positional>", "Options takes keyword arguments only")
        known = [f.name for f in fields(cls)]
        for key in kwargs:
            if key not in known:
                raise OptionsError(key, f"unknown option; valid options: {', '.join(known)}")
        return super().__call__(**kwargs)


@dataclass(frozen=True, kw_only=True)
class Options(metaclass=_RejectUnknownKeys):
    """The options of the memcompile backend (`torch.compile(..., options={...})`).

    `Options(**d)` validates at once and normalizes: byte strings become ints, a stream dict
    becomes `StreamOptions`, pass lists become tuples.
    """

    memory_budget: float | int | str | None = "auto"
    """Cap on the step's peak bytes above what is live at its start: a fraction of the
    save-everything plan's peak (a float: 1.0 is everything), a byte count (an int of at
    least 1 MiB, or a string with a unit such as "512MiB"; a smaller int is refused, since 1
    would be one byte), None (least recompute) or "auto" (least peak for at most one extra
    forward of recompute). A byte budget holds at every length: a graph with symbolic sizes is
    planned again at each length it runs at (`memcompile.per_size`)."""
    stream: bool | str | StreamOptions = "auto"
    """StreamBP: "auto", True, False or a dict of `StreamOptions` fields."""
    sequence_parallel: bool | Mapping[str, Any] | SequenceParallelOptions = False
    """Attention across the ranks of a torch.distributed group: False, True (the default
    group) or a dict of `SequenceParallelOptions` fields (`schedule` "balanced"/"ring" is an
    alias of `layout` "zigzag"/"contiguous"); normalized to `SequenceParallelOptions`."""
    passes: tuple[str, ...] | None = None
    """The pipeline by pass name, in order; None runs the default pipeline."""
    disable_passes: tuple[str, ...] = ()
    """Pass names to skip."""
    runtime: Literal["inductor", "eager"] = "inductor"
    """ "inductor" compiles the rewritten graphs; "eager" runs them in Python, freeing each
    tensor after its last use (the runtime whose live bytes the simulator predicts exactly)."""
    cost_model: str | Mapping[str, float] = "measured"
    """What the remat planner prices recomputation with. "measured": constants timed on the
    device in the graph's dtype once per process, their ratios rounded to powers of two so
    that load does not move them; "fixed": representative constants of the device's kind, the
    same plan on every run and machine; or a dict of `seconds_per_op`, `seconds_per_byte` and
    `seconds_per_flop` (the `cost` of an earlier plan, `GraphRecord.plan.cost.to_dict()`, also
    in its note), or the path of a JSON file holding one, to plan as that run did."""
    dump_dir: str | None = None
    """Directory for every graph before and after each pass, and the decisions."""
    offload: bool | Mapping[str, Any] | OffloadOptions = False
    """Offload saved values to host memory where the transfers hide under the compute between
    their producer and their first backward reader (`planning.offload`): False, True (measured
    bandwidth) or a dict of `OffloadOptions` fields; normalized to False or `OffloadOptions`.
    A CUDA graph only, unless `on_cpu`."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check = _CHECKS[f.name]
            object.__setattr__(self, f.name, check(getattr(self, f.name)))
        _check_stream_budget(self.stream, self.memory_budget)
        _check_stream_sequence_parallel(self.stream, self.sequence_parallel)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | Options | None) -> Options:
        """Build validated options from what torch.compile hands the backend."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise OptionsError(
                "options", f"expected a dict of options, got {type(options).__name__}"
            )
        return cls(**dict(options))

    def replace(self, **changes: Any) -> Options:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)


def _check_stream_budget(stream: Any, budget: Any) -> None:
    """Under stream, a numeric budget decides how many layer inputs are held: it cannot be
    combined with fixing that number by hand."""
    if not isinstance(stream, StreamOptions):
        return
    if stream.checkpoints != "auto" and stream.layers_per_checkpoint > 1:
        raise OptionsError("stream.checkpoints", "set either checkpoints or "
                           "layers_per_checkpoint, not both: each decides which layer inputs "
                           "are kept")
    fixed = stream.checkpoints != "auto" or stream.layers_per_checkpoint > 1
    if fixed and budget is not None and budget != "auto":
        raise OptionsError("memory_budget", f"{budget!r} with stream.checkpoints or "
                           "stream.layers_per_checkpoint set: under stream a numeric budget "
                           "decides how many layer inputs are held; set one or the other")


def _check_stream_sequence_parallel(stream: Any, sequence_parallel: Any) -> None:
    """Under sequence parallelism each rank streams its shard, sequence chunks whose keys and
    values are computed once per layer pass and gathered from every rank: the other ways of
    chunking are not built."""
    if not sequence_parallel or not isinstance(stream, StreamOptions):
        return
    valid = ("valid with sequence_parallel: stream True or a dict with dim 'sequence' and "
             "keys_values 'once' (the defaults), 'auto' (off under sequence_parallel) or False")
    if stream.dim != "sequence":
        raise OptionsError("stream.dim", f"{stream.dim!r} with sequence_parallel is not "
                           f"available: a rank streams its shard along the sequence; {valid}")
    if stream.keys_values != "once":
        raise OptionsError("stream.keys_values", f"{stream.keys_values!r} with "
                           "sequence_parallel is not available: each layer pass sends the "
                           "keys and values of the whole shard to the other ranks, so they "
                           f"are computed once; {valid}")


def _check_budget(value: Any) -> float | int | str | None:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool):
        raise OptionsError("memory_budget", f"a bool is not a budget; valid: {_BUDGET_VALID}")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise OptionsError("memory_budget", f"{value} is outside (0, 1]; valid: {_BUDGET_VALID}")
        return value
    if isinstance(value, int):
        if value <= 0:
            raise OptionsError("memory_budget", f"{value} bytes is not positive; valid: {_BUDGET_VALID}")
        if value < _LEAST_INT_BUDGET:
            # 1 against 1.0: one byte against everything. No step fits in less than a MiB, so
            # a small int is a fraction written without its point; say both readings.
            raise OptionsError("memory_budget", (
                f"{value} reads as {value:,} byte{'s' if value > 1 else ''}; for the fraction "
                f"write {float(value) if value == 1 else 'a float in (0, 1], e.g. 0.5'}; for "
                f"bytes write at least 1 MiB ({_LEAST_INT_BUDGET:,}) as an int, or a string "
                f"with a unit, e.g. '512MiB' ('{value}B' if you mean exactly that)"))
        return value
    if isinstance(value, str):
        try:
            nbytes = parse_bytes(value)
        except ValueError as e:
            raise OptionsError("memory_budget", f"{e}; valid: {_BUDGET_VALID}") from None
        if nbytes <= 0:
            raise OptionsError("memory_budget", f"{nbytes} bytes is not positive; valid: "
                               f"{_BUDGET_VALID}")
        return nbytes  # a string names its unit: no small-int trap
    raise OptionsError("memory_budget", f"got {value!r}; valid: {_BUDGET_VALID}")


_COST_MODEL_KEYS = ("seconds_per_op", "seconds_per_byte", "seconds_per_flop")
_COST_MODEL_VALID = ('"measured", "fixed", a dict of seconds_per_op, seconds_per_byte and '
                     'seconds_per_flop (positive numbers), or the path of a JSON file of one')


def _check_cost_model(value: Any) -> str | dict[str, float]:
    if isinstance(value, str) and value in ("measured", "fixed"):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        try:
            with open(path) as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            raise OptionsError("cost_model", f"{path!r} is neither a name nor a readable JSON "
                               f"file ({e}); valid: {_COST_MODEL_VALID}") from None
    if not isinstance(value, Mapping):
        raise OptionsError("cost_model", f"got {value!r}; valid: {_COST_MODEL_VALID}")
    if sorted(value) != sorted(_COST_MODEL_KEYS):
        raise OptionsError("cost_model", f"keys {sorted(value)}; valid: {_COST_MODEL_VALID}")
    for key in _COST_MODEL_KEYS:
        v = value[key]
        if not _is_positive_number(v):
            raise OptionsError(f"cost_model.{key}", f"got {v!r}; valid: {_COST_MODEL_VALID}")
    return {key: float(value[key]) for key in _COST_MODEL_KEYS}


def _check_chunk(key: str, value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise OptionsError(f"stream.{key}", f"got {value!r}; valid: a positive int of tokens or 'auto'")


def _is_positive_number(value: Any) -> bool:
    """A finite number above 0, int or float (a bool is neither)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and 0 < value < math.inf)


def _reject_unknown_keys(option: str, value: Mapping, known: Sequence[str]) -> None:
    for key in value:
        if key not in known:
            raise OptionsError(f"{option}.{key}", f"unknown key; valid keys: {', '.join(known)}")


def _switch_or_dict(option: str, value: Any, cls: type, known: Sequence[str], valid: str) -> Any:
    """An option that is `False`, `True` (`cls()`), a `cls`, or a dict of `cls`'s fields: the
    normalized value, or the dict (its keys checked) for the caller to check field by field."""
    if value is False or isinstance(value, cls):
        return value
    if value is True:
        return cls()
    if not isinstance(value, Mapping):
        raise OptionsError(option, f"got {value!r}; valid: {valid}")
    _reject_unknown_keys(option, value, known)
    return value


def _check_stream(value: Any) -> bool | str | StreamOptions:
    if isinstance(value, (StreamOptions, bool)) or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, Mapping):
        _reject_unknown_keys("stream", value, [f.name for f in fields(StreamOptions)])
        dim = value.get("dim", "sequence")
        if dim not in STREAM_DIMS:
            raise OptionsError("stream.dim", f"got {dim!r}; valid: {', '.join(STREAM_DIMS)}")
        return StreamOptions(
            chunk_size=_check_chunk("chunk_size", value.get("chunk_size", "auto")),
            logits_chunk_size=_check_chunk(
                "logits_chunk_size", value.get("logits_chunk_size", "auto")
            ),
            dim=dim,
            keys_values=_check_keys_values(value.get("keys_values", "once")),
            layers_per_checkpoint=_check_positive("layers_per_checkpoint",
                                                  value.get("layers_per_checkpoint", 1)),
            checkpoints=_check_checkpoints(value.get("checkpoints", "auto")),
            keep_attention=_check_switch("stream.keep_attention",
                                         value.get("keep_attention", False)),
        )
    raise OptionsError(
        "stream", f"got {value!r}; valid: 'auto', True, False, or a dict with keys "
        "chunk_size, logits_chunk_size, dim, keys_values, layers_per_checkpoint, checkpoints, "
        "keep_attention"
    )


def _check_checkpoints(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise OptionsError("stream.checkpoints",
                       f"got {value!r}; valid: 'auto' or a positive int of layer inputs")


def _check_positive(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise OptionsError(f"stream.{key}", f"got {value!r}; valid: a positive int")


def _check_switch(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise OptionsError(key, f"got {value!r}; valid: True or False")


def _check_keys_values(value: Any) -> str:
    if value in STREAM_KEYS_VALUES:
        return value
    raise OptionsError("stream.keys_values",
                       f"got {value!r}; valid: {', '.join(STREAM_KEYS_VALUES)}")


def _check_sequence_parallel(value: Any) -> bool | SequenceParallelOptions:
    value = _switch_or_dict("sequence_parallel", value, SequenceParallelOptions, SP_KEYS,
                            f"False, True, or a dict with keys {', '.join(SP_KEYS)}")
    if not isinstance(value, Mapping):
        return value
    layout = value.get("layout")
    if layout is not None and layout not in SP_LAYOUTS:
        raise OptionsError("sequence_parallel.layout",
                           f"got {layout!r}; valid: {', '.join(SP_LAYOUTS)}")
    if "schedule" in value:
        schedule = value["schedule"]
        if schedule not in SP_SCHEDULES:
            raise OptionsError("sequence_parallel.schedule",
                               f"got {schedule!r}; valid: {', '.join(SP_SCHEDULES)} (aliases of "
                               f"layout {', '.join(SP_SCHEDULES.values())})")
        if layout is not None and SP_SCHEDULES[schedule] != layout:
            raise OptionsError("sequence_parallel.schedule",
                               f"{schedule!r} is layout {SP_SCHEDULES[schedule]!r}, but layout "
                               f"is {layout!r}: give one of them")
        layout = SP_SCHEDULES[schedule]
    timeout = value.get("timeout", 300.0)
    if not _is_positive_number(timeout):
        raise OptionsError("sequence_parallel.timeout",
                           f"got {timeout!r}; valid: a positive number of seconds")
    group = value.get("group")
    if group is not None and not _is_process_group(group):
        raise OptionsError("sequence_parallel.group", f"got {type(group).__name__}; valid: "
                           "None (the default group) or a torch.distributed ProcessGroup")
    return SequenceParallelOptions(group=group, layout=layout or "zigzag",
                                   timeout=float(timeout))


def _is_process_group(value: Any) -> bool:
    import torch.distributed as dist  # here: config must import without torch.distributed

    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def _check_pass_names(key: str, value: Any, *, allow_none: bool) -> tuple[str, ...] | None:
    from memcompile.passes.registry import pass_names

    if value is None and allow_none:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise OptionsError(key, f"got {value!r}; valid: a list of pass names")
    valid = pass_names()
    for name in value:
        if name not in valid:
            raise OptionsError(key, f"unknown pass {name!r}; valid passes: {', '.join(valid)}")
    return tuple(value)


def _check_runtime(value: Any) -> str:
    if value not in RUNTIMES:
        raise OptionsError("runtime", f"got {value!r}; valid: {', '.join(RUNTIMES)}")
    return value


def _check_dump_dir(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise OptionsError("dump_dir", f"got {value!r}; valid: None or a directory path")


def _check_offload(value: Any) -> bool | OffloadOptions:
    value = _switch_or_dict("offload", value, OffloadOptions,
                            [f.name for f in fields(OffloadOptions)], _OFFLOAD_VALID)
    if not isinstance(value, Mapping):
        return value
    bandwidth = value.get("bandwidth", "measured")
    if bandwidth != "measured" and not _is_positive_number(bandwidth):
        raise OptionsError("offload.bandwidth", f"got {bandwidth!r}; valid: {_OFFLOAD_VALID}")
    on_cpu = value.get("on_cpu", False)
    if not isinstance(on_cpu, bool):
        raise OptionsError("offload.on_cpu", f"got {on_cpu!r}; valid: {_OFFLOAD_VALID}")
    return OffloadOptions(bandwidth=bandwidth if bandwidth == "measured" else float(bandwidth),
                          on_cpu=on_cpu)


_CHECKS = {
    "memory_budget": _check_budget,
    "cost_model": _check_cost_model,
    "stream": _check_stream,
    "sequence_parallel": _check_sequence_parallel,
    "passes": lambda v: _check_pass_names("passes", v, allow_none=True),
    "disable_passes": lambda v: _check_pass_names("disable_passes", v, allow_none=False),
    "runtime": _check_runtime,
    "dump_dir": _check_dump_dir,
    "offload": _check_offload,
}
