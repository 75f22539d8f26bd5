"""How long `plan_remat` takes on a 32-layer Llama-style joint graph (capture excluded).

Run: python benchmarks/planner_time.py [--layers 32] [--seq-len 256] [--runtime inductor]
The joint graph is captured once (as the eager runtime sees it, or, with --runtime inductor, after
Inductor's decompositions, priced on Inductor's buffers); then the planner (graph facts, cost
model, chain, choice) is timed for several budgets, each from scratch.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition

from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from memcompile.analysis.cost import CostModel
from memcompile.analysis.joint import JointGraph
from memcompile.errors import MemoryBudgetError
from memcompile.models import PRESETS, build_model, make_batch
from memcompile.partition import prepare_joint
from memcompile.planning.remat import plan


def capture(layers: int, seq_len: int, runtime: str = "eager"):
    """The prepared joint graph of one training step and its number of forward outputs."""
    config = dataclasses.replace(PRESETS["small"], num_layers=layers, vocab_size=4096)
    model = build_model(config)
    batch = make_batch(config, seq_len=seq_len)
    captured = {}

    def partition(gm, joint_inputs, **kwargs):
        kwargs.pop("compiler", None)
        captured["gm"], captured["n"] = prepare_joint(gm), kwargs["num_fwd_outputs"]
        return default_partition(gm, joint_inputs, **kwargs)

    if runtime == "inductor":
        class Capture(CustomPartitionerFn):
            def __call__(self, gm, joint_inputs, **kwargs):
                partition(gm, joint_inputs, **kwargs)
                raise _Captured  # the joint graph is all we need: skip Inductor's codegen

            def uuid(self):
                return None  # never cached: the point is to see the joint graph

        def backend(gm, example_inputs):
            with torch._functorch.config.patch(enable_autograd_cache=False):
                return compile_fx(gm, example_inputs,
                                  config_patches={"custom_partitioner_fn": Capture()})
    else:
        backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm),
                               partition_fn=partition)
    try:
        torch.compile(model, backend=backend)(**batch).loss.backward()
    except Exception:
        if "gm" not in captured:
            raise
    return captured["gm"], captured["n"]


class _Captured(Exception):
    """Raised by the Inductor capture once it holds the joint graph."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--runtime", choices=("eager", "inductor"), default="eager",
                        help="whose joint graph and buffers to plan on")
    args = parser.parse_args()
    gm, num_fwd_outputs = capture(args.layers, args.seq_len, args.runtime)
    cost = CostModel.measured("cpu")
    print(f"{args.layers} layers, {len(gm.graph.nodes)} joint nodes, seq {args.seq_len}, "
          f"priced on {args.runtime}'s buffers")
    print("| budget | planner s | plans simulated | planned peak MiB | save-all MiB |")
    print("|---|---|---|---|---|")
    for budget in (None, "auto", 1.0, 0.7, 0.5, 0.3):
        start = time.perf_counter()
        try:
            joint = JointGraph.read(gm, num_fwd_outputs)
            point, summary, _ = plan(joint, budget, cost, fusion=args.runtime == "inductor")
        except MemoryBudgetError as e:
            print(f"| {budget!r} | {time.perf_counter() - start:.2f} | - | below the least "
                  f"peak, {e.least_peak_bytes / 2**20:.1f} | - |")
            continue
        seconds = time.perf_counter() - start
        print(f"| {budget!r} | {seconds:.2f} | {summary.plans_simulated} | "
              f"{point.peak_bytes / 2**20:.1f} | {summary.save_all_peak / 2**20:.1f} |")


if __name__ == "__main__":
    main()
