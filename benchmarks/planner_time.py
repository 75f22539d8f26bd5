"""How long `plan_remat` takes on a 32-layer Llama-style joint graph (capture excluded).

Run: python benchmarks/planner_time.py [--layers 32] [--seq-len 256]
The joint graph is captured once; then the planner (graph facts, cost model, chain, choice) is
timed for several budgets, each from scratch.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition

from memcompile.analysis.cost import CostModel
from memcompile.analysis.joint import JointGraph
from memcompile.errors import MemoryBudgetError
from memcompile.models import PRESETS, build_model, make_batch
from memcompile.partition import prepare_joint
from memcompile.passes.remat_plan import plan


def capture(layers: int, seq_len: int):
    """The prepared joint graph of one training step and its number of forward outputs."""
    config = dataclasses.replace(PRESETS["small"], num_layers=layers, vocab_size=4096)
    model = build_model(config)
    batch = make_batch(config, seq_len=seq_len)
    captured = {}

    def partition(gm, joint_inputs, **kwargs):
        captured["gm"], captured["n"] = prepare_joint(gm), kwargs["num_fwd_outputs"]
        return default_partition(gm, joint_inputs, **kwargs)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), partition_fn=partition)
    torch.compile(model, backend=backend)(**batch).loss.backward()
    return captured["gm"], captured["n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    gm, num_fwd_outputs = capture(args.layers, args.seq_len)
    cost = CostModel.measured("cpu")
    print(f"{args.layers} layers, {len(gm.graph.nodes)} joint nodes, seq {args.seq_len}")
    print("| budget | planner s | plans simulated | planned peak MiB | save-all MiB |")
    print("|---|---|---|---|---|")
    for budget in (None, "auto", 1.0, 0.7, 0.5, 0.3):
        start = time.perf_counter()
        try:
            joint = JointGraph.read(gm, num_fwd_outputs)
            point, summary, _ = plan(joint, budget, cost)
        except MemoryBudgetError as e:
            print(f"| {budget!r} | {time.perf_counter() - start:.2f} | - | below the least "
                  f"peak, {e.least_peak_bytes / 2**20:.1f} | - |")
            continue
        seconds = time.perf_counter() - start
        print(f"| {budget!r} | {seconds:.2f} | {summary.plans_simulated} | "
              f"{point.peak_bytes / 2**20:.1f} | {summary.save_all_peak / 2**20:.1f} |")


if __name__ == "__main__":
    main()
