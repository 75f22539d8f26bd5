"""A short byte-level pretraining run of a small built-in Llama with AdamW, GaLore and Natural
GaLore: same seed, same initial weights, same batches for each.

Run: python benchmarks/pretrain.py [--steps 300] [--optimizers adamw,galore,natural_galore]
         [--batch-size 8] [--seq-len 256] [--out benchmarks/results/optim-cpu]

Text: the Python standard library's own ``.py`` sources (every machine has them; nothing is
downloaded), test directories and site-packages left out, read in sorted path order and
concatenated; the first ``--train-bytes`` are the training text, the next ``--eval-bytes`` the
held-out text. Tokens are the bytes themselves (ids 0..255). Training batches are windows at
offsets drawn once from ``--seed``; evaluation is the mean loss over fixed, evenly spaced windows
of the held-out text. The model runs eagerly (no torch.compile): the comparison is of the
optimizers, and eager keeps compile time out of the per-step times.

Recipe (GaLore's smallest, Zhao et al. 2024): AdamW lr 1e-3; GaLore and Natural GaLore lr 1e-2
with scale 0.25 at rank d/4 on the weights ``lowrank(model=...)`` picks (embeddings, norms and
the head stay on AdamW at the same lr, as in GaLore's scripts); weight decay 0; linear warm-up
over the first 10% of steps, then cosine decay to 10% of the lr.

Projector refresh gap: 50 by default, not the paper's 200. The paper's runs are 10k+ steps (50+
refreshes); in 300 steps a gap of 200 refreshes twice (steps 0 and 200), so the subspace chosen
from the random-init gradient at step 0 would steer two thirds of the run. 50 refreshes six times
(0, 50, ..., 250) while keeping most of Natural GaLore's 20-gradient history window (cleared at
each refresh) filled. ``--proj-gap 200`` runs the paper's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shlex
import statistics
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from memcompile.measure import intra_op_threads

from memcompile.models import PRESETS, LlamaConfig, build_model
from memcompile.optim import lowrank, select_weights, state_bytes

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "galore", "natural_galore")
"""Optimizers this run compares."""

MODELS: dict[str, LlamaConfig] = {
    # ~3.3M parameters: 300 steps of 8×256 tokens fit in a few minutes on 2 CPU cores.
    "byte256": LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_layers=4,
                           num_heads=4, num_kv_heads=4),
    "tiny": PRESETS["tiny"],  # smoke tests
}
"""Model configurations by name; all have the byte vocabulary (256)."""

_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


# ---------------------------------------------------------------------------------- data


@functools.cache
def stdlib_sources() -> tuple[Path, ...]:
    """The standard library's ``.py`` files in sorted relative-path order, tests left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py")
             if not _SKIPPED_DIRS & set(f.relative_to(root).parts[:-1])]
    return tuple(sorted(files, key=lambda f: f.relative_to(root).as_posix()))


def load_text(train_bytes: int, eval_bytes: int) -> tuple[torch.Tensor, torch.Tensor,
                                                         dict[str, Any]]:
    """Training and held-out token ids (uint8 → int64) and a description of where they came from.

    The held-out text is the bytes right after the training text: files later in sorted order,
    so evaluation is on code the model never trained on.
    """
    wanted = train_bytes + eval_bytes
    chunks, total, files = [], 0, 0
    for path in stdlib_sources():
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        files += 1
        if total >= wanted:
            break
    text = b"".join(chunks)
    if len(text) < wanted:
        raise ValueError(f"the standard library has only {len(text):,} bytes of sources; "
                         f"asked for {wanted:,}")
    text = text[:wanted]
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    info = {"source": sysconfig.get_paths()["stdlib"], "python": sys.version.split()[0],
            "files": files, "train_bytes": train_bytes, "eval_bytes": eval_bytes,
            "sha256": hashlib.sha256(text).hexdigest()}
    return tokens[:train_bytes], tokens[train_bytes:], info


def batch_offsets(n_tokens: int, steps: int, batch_size: int, seq_len: int,
                  seed: int) -> torch.Tensor:
    """(steps, batch_size) window offsets into the training text, drawn once from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (steps, batch_size), generator=generator)


def windows(tokens: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(len(offsets), seq_len) windows of ``tokens``; labels are the same ids (the loss shifts)."""
    return tokens[offsets[:, None] + torch.arange(seq_len)]


def eval_windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows spread evenly over the held-out text."""
    count = min(count, len(tokens) // seq_len)
    if count == 0:
        raise ValueError(f"held-out text of {len(tokens)} tokens is shorter than one window")
    stride = len(tokens) // count
    return windows(tokens, torch.arange(count) * stride, seq_len)


# ------------------------------------------------------------------------------- training


def make_optimizer(name: str, model: torch.nn.Module,
                   args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW, or AdamW swapped by ``lowrank`` into GaLore / Natural GaLore."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr_adamw, weight_decay=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr_galore, weight_decay=0.0)
    return lowrank(opt, model=model, rank=args.rank, update_proj_gap=args.proj_gap,
                   scale=args.scale, method=name)


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """GaLore's schedule: linear warm-up, then cosine to 10% of the lr ("constant": 1)."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over the held-out windows (each window weighted equally)."""
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
              for chunk in ids.split(batch_size)]
    model.train()
    return sum(losses) / len(ids)


def train(name: str, args: argparse.Namespace, train_ids: torch.Tensor,
          offsets: torch.Tensor, held_out: torch.Tensor) -> dict[str, Any]:
    """Train one optimizer for ``args.steps`` steps; its losses, times and state bytes."""
    torch.manual_seed(args.seed)
    model = build_model(MODELS[args.model], seed=args.seed)
    opt = make_optimizer(name, model, args)
    warmup = max(1, round(args.warmup_frac * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.steps, warmup, args.schedule))
    train_loss, step_seconds, evals = [], [], {0: evaluate(model, held_out, args.batch_size)}
    for step in range(args.steps):
        ids = windows(train_ids, offsets[step], args.seq_len)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        scheduler.step()
        train_loss.append(loss.item())
        done = step + 1
        log.info("%s step %d: train loss %.4f (%.2f s)", name, done, train_loss[-1],
                 step_seconds[-1])
        if not math.isfinite(train_loss[-1]):
            raise FloatingPointError(f"{name}: train loss {train_loss[-1]} at step {done}")
        if done % args.eval_every == 0 or done == args.steps:
            evals[done] = evaluate(model, held_out, args.batch_size)
            log.info("%s step %d: eval loss %.4f", name, done, evals[done])
    projected = list(select_weights(model).values())
    return {
        "train_loss": train_loss, "eval_loss": {str(k): v for k, v in evals.items()},
        "step_seconds_median": statistics.median(step_seconds),
        "step_seconds_mean": statistics.fmean(step_seconds), "train_seconds": sum(step_seconds),
        "state_bytes_total": state_bytes(opt), "state_bytes_projected": state_bytes(opt, projected),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


# ---------------------------------------------------------------------------------- output


def smoothed(losses: Sequence[float], step: int, window: int) -> float:
    """Mean train loss of the ``window`` steps ending at ``step`` (steps counted from 1)."""
    part = losses[max(0, step - window):step]
    return statistics.fmean(part)


def table_steps(steps: int, every: int) -> list[int]:
    """The steps the table shows: multiples of ``every``, and the last step."""
    return sorted({*range(every, steps + 1, every), steps})


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Final losses, the ratios GaLore/AdamW and NaturalGaLore/GaLore, and the two targets."""
    runs, steps, window = results["runs"], results["args"]["steps"], results["args"]["smooth"]
    final = {name: {"train": smoothed(r["train_loss"], steps, window),
                    "eval": r["eval_loss"][str(steps)]}
             for name, r in runs.items() if r.get("ok")}
    out: dict[str, Any] = {"final": final}
    for key, (num, den) in {"galore/adamw": ("galore", "adamw"),
                            "natural_galore/galore": ("natural_galore", "galore")}.items():
        if num in final and den in final:
            out[key] = {k: final[num][k] / final[den][k] for k in ("train", "eval")}
    if "galore/adamw" in out:
        out["galore_within_5pct"] = out["galore/adamw"]["eval"] <= 1.05
    if "natural_galore" in final and "galore" in final:
        shown = [str(s) for s in table_steps(steps, results["args"]["table_every"])]
        at_or_below = [s for s in shown if s in runs["natural_galore"]["eval_loss"]
                       and runs["natural_galore"]["eval_loss"][s]
                       <= runs["galore"]["eval_loss"][s]]
        out["natural_at_or_below_galore_eval_steps"] = f"{len(at_or_below)}/{len(shown)}"
    return out


def render_markdown(results: Mapping[str, Any]) -> str:
    """The run as markdown: command, setup, the loss table, ratios, state bytes and times."""
    a, runs = results["args"], results["runs"]
    ok = [n for n in a["optimizers"] if runs[n].get("ok")]
    data, cfg = results["data"], results["model_config"]
    lines = [
        "# Byte-level pretraining: AdamW, GaLore, Natural GaLore", "", f"`{results['command']}`",
        "", f"Model `{a['model']}`: hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, "
        f"{cfg['num_heads']} heads, intermediate {cfg['intermediate_size']}, vocab "
        f"{cfg['vocab_size']} (bytes); float32, eager, torch threads {results['threads']}, torch "
        f"{results['torch_version']}. Text: {data['files']} stdlib files of Python "
        f"{data['python']} in sorted order, {data['train_bytes']:,} bytes for training, the "
        f"next {data['eval_bytes']:,} held out (sha256 {data['sha256'][:12]}). Batch "
        f"{a['batch_size']} × {a['seq_len']} tokens, {a['steps']} steps, seed {a['seed']}; "
        f"same weights and batches for all. AdamW lr {a['lr_adamw']:g}; GaLore and Natural "
        f"GaLore lr {a['lr_galore']:g}, scale {a['scale']:g}, rank {a['rank']}, "
        f"update_proj_gap {a['proj_gap']}; weight decay 0; schedule {a['schedule']} "
        f"(warm-up {a['warmup_frac']:.0%}). {results['date']}.", "",
        f"Train: mean loss of the {a['smooth']} steps ending at the step. Eval: mean loss on "
        f"{results['eval_windows']} held-out windows after that many steps. Loss in nats/byte.",
        "", "| step | " + " | ".join(f"{n} train | {n} eval" for n in ok) + " |",
        "|---|" + "---|---|" * len(ok),
    ]
    for step in table_steps(a["steps"], a["table_every"]):
        cells = []
        for n in ok:
            ev = runs[n]["eval_loss"].get(str(step))
            cells += [f"{smoothed(runs[n]['train_loss'], step, a['smooth']):.4f}",
                      "-" if ev is None else f"{ev:.4f}"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    summary = results["summary"]
    lines += ["", "| ratio at the last step | train | eval |", "|---|---|---|"]
    for key in ("galore/adamw", "natural_galore/galore"):
        if key in summary:
            lines.append(f"| {key} | {summary[key]['train']:.4f} | {summary[key]['eval']:.4f} |")
    if "galore_within_5pct" in summary:
        lines += ["", f"GaLore's final eval loss within 5% of AdamW's: "
                      f"{'yes' if summary['galore_within_5pct'] else 'no'}."]
    if "natural_at_or_below_galore_eval_steps" in summary:
        lines += [f"Natural GaLore's eval loss at or below GaLore's at "
                  f"{summary['natural_at_or_below_galore_eval_steps']} of the table's steps."]
    lines += ["", "| optimizer | state, projected KiB | state, all KiB | step s (median) | "
                  "step s (mean) | train s |", "|---|---|---|---|---|---|"]
    for n in a["optimizers"]:
        r = runs[n]
        if not r.get("ok"):
            lines.append(f"| {n} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {n} | {r['state_bytes_projected'] / 1024:,.1f} | "
                     f"{r['state_bytes_total'] / 1024:,.1f} | {r['step_seconds_median']:.3f} | "
                     f"{r['step_seconds_mean']:.3f} | {r['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Train (raw, faint; smoothed, solid) and eval loss curves of every optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = results["args"]["smooth"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(results["runs"].items()):
        if not r.get("ok"):
            continue
        color = f"C{i}"
        steps = range(1, len(r["train_loss"]) + 1)
        left.plot(steps, r["train_loss"], color=color, alpha=0.25, linewidth=0.8)
        left.plot(steps, [smoothed(r["train_loss"], s, window) for s in steps], color=color,
                  label=name)
        ev = sorted((int(k), v) for k, v in r["eval_loss"].items())
        right.plot([k for k, _ in ev], [v for _, v in ev], "o-", color=color, label=name)
    left.set(title=f"train loss ({window}-step mean)", xlabel="step", ylabel="nats/byte")
    right.set(title="held-out loss", xlabel="step", ylabel="nats/byte")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ CLI


def _optimizers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {unknown}; valid: "
                                         f"{', '.join(OPTIMIZERS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--optimizers", type=_optimizers, default=list(OPTIMIZERS))
    p.add_argument("--model", choices=sorted(MODELS), default="byte256")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=None, help="default: hidden size / 4")
    p.add_argument("--proj-gap", type=int, default=50,
                   help="update_proj_gap (default 50: six refreshes in 300 steps)")
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--lr-adamw", type=float, default=1e-3)
    p.add_argument("--lr-galore", type=float, default=1e-2)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup-frac", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--table-every", type=int, default=50)
    p.add_argument("--smooth", type=int, default=25, help="train-loss mean window (steps)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--train-bytes", type=int, default=8 * 2**20)
    p.add_argument("--eval-bytes", type=int, default=512 * 2**10)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core); 1 gives "
                        "steadier times on a machine shared with other work")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/optim-cpu"))
    return p


def format_command(args: argparse.Namespace) -> str:
    """The full command line that reproduces ``args`` (every option spelled out)."""
    argv = ["python", "benchmarks/pretrain.py"]
    for key, value in vars(args).items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return shlex.join(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train every optimizer; write ``pretrain.md``, ``pretrain.json`` and ``pretrain.png``."""
    if args.rank is None:
        args.rank = MODELS[args.model].hidden_size // 4
    command = format_command(args)
    with intra_op_threads(args.threads):
        results = _run(args, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "pretrain.md").write_text(render_markdown(results))
    plot(results, args.out / "pretrain.png")
    log.info("wrote %s/pretrain.{md,json,png}", args.out)
    return results


def _run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train every optimizer; the results, not yet written."""
    train_ids, eval_ids, data = load_text(args.train_bytes, args.eval_bytes)
    held_out = eval_windows(eval_ids, args.seq_len, args.eval_windows)
    offsets = batch_offsets(len(train_ids), args.steps, args.batch_size, args.seq_len, args.seed)
    runs: dict[str, Any] = {}
    for name in args.optimizers:
        try:
            runs[name] = {**train(name, args, train_ids, offsets, held_out), "ok": True}
        except (FloatingPointError, RuntimeError, ValueError) as e:  # a diverged or failed run
            log.error("%s failed: %s", name, e)
            runs[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    results: dict[str, Any] = {
        "command": command, "args": {k: (str(v) if isinstance(v, Path) else v)
                                     for k, v in vars(args).items()},
        "model_config": dataclasses.asdict(MODELS[args.model]), "data": data,
        "eval_windows": len(held_out), "runs": runs, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results["summary"] = summarize(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 1 if any optimizer's run failed."""
    args = build_parser().parse_args(argv)
    results = run(args)
    print((args.out / "pretrain.md").read_text())
    return 0 if all(r["ok"] for r in results["runs"].values()) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(main())
