"""The bench's command-line values: parsing and checking each argument, and the command line that
reproduces a run. The `bench` subparser that uses them is in `launch`."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any

from memcompile.config import parse_bytes

FIXED_MODES = ("eager", "checkpoint", "inductor", "memcompile", "stream")
DEFAULT_MODES = ("eager", "checkpoint", "inductor", "budget_0.5", "budget_0.0", "memcompile")
VALID_MODES_TEXT = (
    "eager, checkpoint, inductor, memcompile, stream, stream_g<layers per saved input> "
    "(e.g. stream_g2), stream_c<layer inputs held at once> (e.g. stream_c3), any stream mode "
    "with _keep (attention outputs kept, e.g. stream_keep, stream_c2_keep), "
    "budget_<float in [0, 1]> (e.g. budget_0.5), "
    "mcbudget_<float in (0, 1]>, mcbudget_<bytes with a unit> (e.g. mcbudget_280MiB), "
    "mcbudget_auto or mcbudget_none (e.g. mcbudget_0.5)"
)
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
_BUDGET_RE = re.compile(r"^budget_(.+)$")
_MC_BUDGET_RE = re.compile(r"^mcbudget_(.+)$")
_MC_BUDGET_WORDS = {"auto": "auto", "none": None}
_MC_BUDGET_BYTES_RE = re.compile(r"^\d+(?:\.\d+)?[a-zA-Z]+$")  # a unit: a bare number is a fraction
_STREAM_GROUP_RE = re.compile(r"^stream_g([1-9][0-9]*)$")
_STREAM_CHECKPOINTS_RE = re.compile(r"^stream_c([1-9][0-9]*)$")


def parse_seq_lens(text: str) -> list[int]:
    """Parse ``"512,1024,2048"`` into positive, distinct ints; raise `ValueError` otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(
            f"bad --seq-lens {text!r}: write positive integers separated by commas, e.g. 512,1024"
        )
    lens = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"bad sequence length {part!r} in {text!r}: valid are positive integers, "
                "separated by commas, e.g. 512,1024"
            ) from None
        if value <= 0:
            raise ValueError(f"bad sequence length {value} in {text!r}: it must be positive")
        lens.append(value)
    if len(set(lens)) != len(lens):
        raise ValueError(f"bad --seq-lens {text!r}: a length appears twice")
    return lens


def budget_of(mode: str) -> float | None:
    """The activation memory budget of a `budget_<f>` mode, or None for any other mode."""
    match = _BUDGET_RE.match(mode)
    if match is None:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def mc_budget_options(mode: str) -> dict[str, Any] | None:
    """The memcompile options an `mcbudget_<x>` mode sets over ``--options``, or None otherwise.

    ``mcbudget_0.5`` gives ``{"memory_budget": 0.5}`` (a fraction of the save-everything plan's
    peak, in (0, 1]); ``mcbudget_280MiB`` gives ``{"memory_budget": "280MiB"}`` (bytes: a
    number with a unit, as `memcompile.config.parse_bytes` reads it; this is how the bench asks
    memcompile for the peak another mode reached); ``mcbudget_auto`` and ``mcbudget_none`` give
    "auto" and None.
    """
    match = _MC_BUDGET_RE.match(mode)
    if match is None:
        return None
    text = match.group(1)
    if text in _MC_BUDGET_WORDS:
        return {"memory_budget": _MC_BUDGET_WORDS[text]}
    if _MC_BUDGET_BYTES_RE.match(text):
        try:
            nbytes = parse_bytes(text)
        except ValueError:
            return None
        return {"memory_budget": text} if nbytes > 0 else None
    try:
        value = float(text)  # always a float: an int budget would mean bytes
    except ValueError:
        return None
    return {"memory_budget": value} if 0.0 < value <= 1.0 else None


def stream_options_of(mode: str) -> dict[str, Any] | None:
    """The stream options of `stream` ({}), `stream_g<g>` (`layers_per_checkpoint` g) and
    `stream_c<c>` (`checkpoints` c), each with `keep_attention` when the mode ends in `_keep`,
    or None for any other mode."""
    if mode.endswith("_keep"):
        base = stream_options_of(mode.removesuffix("_keep"))
        return None if base is None or "keep_attention" in base else {**base,
                                                                       "keep_attention": True}
    if mode == "stream":
        return {}
    if match := _STREAM_GROUP_RE.match(mode):
        return {"layers_per_checkpoint": int(match.group(1))}
    if match := _STREAM_CHECKPOINTS_RE.match(mode):
        return {"checkpoints": int(match.group(1))}
    return None


def is_budget_mode(mode: str) -> bool:
    """Whether `mode` is a point on a budget sweep: torch's `budget_<f>` or memcompile's
    `mcbudget_<x>`."""
    return budget_of(mode) is not None or mc_budget_options(mode) is not None


def parse_modes(text: str) -> list[str]:
    """Parse a comma-separated list of modes; raise `ValueError` naming a bad one."""
    modes = [m.strip() for m in text.split(",")]
    if not text.strip() or any(not m for m in modes):
        raise ValueError(f"bad --modes {text!r}: write mode names separated by commas; "
                         f"valid modes: {VALID_MODES_TEXT}")
    for mode in modes:
        if (mode not in FIXED_MODES and not is_budget_mode(mode)
                and stream_options_of(mode) is None):
            raise ValueError(f"unknown mode {mode!r}; valid modes: {VALID_MODES_TEXT}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"bad --modes {text!r}: a mode appears twice")
    return modes


def _parse_override_value(text: str) -> Any:
    """An override's value: an int, a float, true/false/none, else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_model(text: str) -> dict[str, Any]:
    """Parse ``--model``: a preset name, or ``hf:<arch>[:key=value,...]``.

    Returns ``{"kind": "preset", "name": ...}`` or
    ``{"kind": "hf", "arch": ..., "overrides": {...}}``; raises `ValueError` listing what is valid.
    """
    from memcompile.models import HF_ARCHS, PRESETS

    valid = (f"a preset ({', '.join(PRESETS)}) or hf:<arch> with arch one of "
             f"{', '.join(HF_ARCHS)}, optionally hf:<arch>:key=value,... "
             "(e.g. hf:llama:hidden_size=512,num_hidden_layers=4)")
    if not text.startswith("hf:"):
        if text not in PRESETS:
            raise ValueError(f"unknown model {text!r}; valid: {valid}")
        return {"kind": "preset", "name": text}
    arch, _, rest = text[3:].partition(":")
    if arch not in HF_ARCHS:
        raise ValueError(f"unknown Hugging Face arch {arch!r} in {text!r}; valid: {valid}")
    overrides: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or not value.strip():
            raise ValueError(f"bad config override {item!r} in {text!r}: write key=value; "
                             f"valid: {valid}")
        overrides[key] = _parse_override_value(value.strip())
    return {"kind": "hf", "arch": arch, "overrides": overrides}


def parse_options(text: str) -> dict[str, Any]:
    """Parse ``--options`` as a JSON object of memcompile options, validated by `Options`."""
    from memcompile.config import Options

    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--options is not valid JSON ({e}): {text!r}; write a JSON object, "
                         'e.g. \'{"runtime": "inductor"}\'') from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {type(options).__name__}: "
                         f"{text!r}; e.g. '{{\"runtime\": \"inductor\"}}'")
    Options(**options)  # OptionsError (a ValueError) names the bad key and lists the valid ones
    return options


def argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's `ValueError` into argparse's error, so its message reaches the user."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert


def _positive(text: str, convert: Any, kind: str, valid: str) -> Any:
    try:
        value = convert(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {kind}; valid: {valid}") from None
    if not value > 0:
        raise ValueError(f"{value} is not positive; valid: {valid}")
    return value


def positive_int(text: str) -> int:
    """Parse a positive integer, saying what was wrong otherwise."""
    return _positive(text, int, "an integer", "a positive integer")


def _positive_float(text: str) -> float:
    return _positive(text, float, "a number", "a positive number of seconds")


def format_command(args: argparse.Namespace) -> str:
    """The `memcompile bench ...` command line that reproduces this run."""
    parts = ["memcompile", "bench", "--model", _model_text(args.model),
             "--seq-lens", ",".join(map(str, args.seq_lens)), "--modes", ",".join(args.modes)]
    if args.options:
        parts += ["--options", json.dumps(args.options)]
    parts += ["--out", str(args.out), "--batch-size", str(args.batch_size),
              "--dtype", args.dtype, "--device", args.device, "--repeat", str(args.repeat),
              "--timeout", repr(args.timeout)]
    if getattr(args, "jobs", 1) != 1:
        parts += ["--jobs", str(args.jobs)]
    return shlex.join(parts)


def _model_text(model: Mapping[str, Any]) -> str:
    if model["kind"] == "preset":
        return model["name"]
    overrides = ",".join(f"{k}={v}" for k, v in model["overrides"].items())
    return f"hf:{model['arch']}" + (f":{overrides}" if overrides else "")
