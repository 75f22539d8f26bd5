"""Sequence parallelism on CPU ranks: one training step of a model whose sequence is split.

Every rank builds the same model, takes its shard of the batch (`shard_batch`), and runs the
step compiled with `options={"sequence_parallel": True}`; attention crosses the ranks, every
other op stays on the shard, and each rank ends the backward with the whole gradient.

    torchrun --nproc-per-node 2 examples/sequence_parallel.py

checks, in float64, the loss over all ranks and every gradient against one process's eager step
on the whole batch, and prints them. With `--measure`, it measures each rank's peak and the
step time at two lengths against one process compiling the same step without sequence
parallelism (rank 0, the other ranks waiting on the store, not spinning on a core):

    torchrun --nproc-per-node 2 examples/sequence_parallel.py --measure --preset small \\
        --dtype float32 --seq-lens 1024,2048
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.distributed as dist

from memcompile.distributed import global_loss, shard_batch, shard_loss
from memcompile.measure import allocator_peak, intra_op_threads, tracked_peak
from memcompile.models import build_model, make_batch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def compiled_step(model, batch, options):
    """`run()`: one step (gradients from None) of `model` on `batch` (a `ShardedBatch`, or a
    dict of the whole batch), compiled by memcompile with `options`; returns the loss."""
    def step(ids, positions, targets, count):
        return shard_loss(model(ids, position_ids=positions).logits, targets, count)

    # Each length compiles afresh, static: Dynamo would otherwise make the second length's
    # graph symbolic, and the lengths would be compared across two kinds of graph.
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="memcompile", options=options)
    count = torch.tensor(float(batch.num_tokens))

    def run():
        model.zero_grad(set_to_none=True)
        loss = compiled(batch.input_ids, batch.position_ids, batch.shift_labels, count)
        loss.backward()
        return loss

    return run


def check(args, rank):
    """Loss and gradients of the sequence-parallel step against one process's eager step."""
    torch.manual_seed(0)
    batch = make_batch(args.preset, batch_size=args.batch_size, seq_len=args.seq_len)
    model = build_model(args.preset, dtype=torch.float64)
    shard = shard_batch(batch["input_ids"], batch["labels"], layout=args.layout)
    options = {"sequence_parallel": {"layout": args.layout}, "runtime": args.runtime}
    loss = compiled_step(model, shard, options)()
    total = global_loss(loss)

    reference = build_model(args.preset, dtype=torch.float64)  # one process, eager, all of it
    ref_loss = reference(**batch).loss
    ref_loss.backward()
    grads = dict(reference.named_parameters())
    worst, where, largest = 0.0, "", 0.0
    for name, param in model.named_parameters():
        ref = grads[name].grad
        error = ((param.grad - ref).norm() / ref.norm()).item()
        largest = max(largest, (param.grad - ref).abs().max().item())
        if error >= worst:
            worst, where = error, name
    print(f"rank {rank}: loss {total.item():.15f} (this rank's share {loss.item():.15f}); "
          f"one process: {ref_loss.item():.15f}; loss difference "
          f"{abs(total.item() - ref_loss.item()):.1e}; gradients: largest difference "
          f"{largest:.1e}, worst relative {worst:.1e} ({where})", flush=True)


def _time(run, repeat):
    """Median seconds of `run` over `repeat` calls, each started together on every rank."""
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_of(runtime):
    """The peak measure for `runtime`: live tensor bytes at the dispatcher for the eager
    runtime, which runs every op through it; the allocator's events for Inductor, whose
    buffers bypass it. (The allocator measure counts as freed the blocks a step frees that an
    earlier profiled step allocated, so only a step's first profiled call reads true.)"""
    return tracked_peak if runtime == "eager" else allocator_peak


def measure(args, rank, world):
    """Per-rank peak and step time at each length against one process, printed by rank 0."""
    dtype = DTYPES[args.dtype]
    peak_fn = peak_of(args.runtime)
    rows = []
    for seq_len in args.seq_lens:
        batch = make_batch(args.preset, batch_size=args.batch_size, seq_len=seq_len)
        model = build_model(args.preset, dtype=dtype)
        shard = shard_batch(batch["input_ids"], batch["labels"], layout=args.layout)
        options = {"sequence_parallel": {"layout": args.layout}, "runtime": args.runtime,
                   "stream": False}
        run = compiled_step(model, shard, options)
        run()  # compiles
        dist.barrier()
        peak = peak_fn(run)
        seconds = _time(run, args.repeat)
        peaks, times = [None] * world, [None] * world
        dist.all_gather_object(peaks, peak)
        dist.all_gather_object(times, seconds)
        single = {}
        store = dist.distributed_c10d._get_default_store()
        if rank != 0:  # wait on the store's socket: a barrier would spin on a core
            store.wait([f"single {seq_len}"], datetime.timedelta(hours=1))
        else:  # one process, the whole batch, the same compiled step without ranks
            whole = shard_batch(batch["input_ids"], batch["labels"], rank=0, world_size=1,
                                layout="contiguous")
            model = build_model(args.preset, dtype=dtype)
            one = compiled_step(model, whole, {"runtime": args.runtime, "stream": False})
            one()
            single["peak"] = peak_fn(one)
            for threads in (1, world):
                with intra_op_threads(threads):
                    single[threads] = statistics.median(
                        _wall(one) for _ in range(args.repeat))
            store.set(f"single {seq_len}", "done")
        rows.append((seq_len, max(peaks), single, max(times)))
    if rank == 0:
        _print(rows, world, args)


def _wall(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _print(rows, world, args):
    mib = 2**20
    print(f"\n{args.preset}, {args.dtype}, batch {args.batch_size}, runtime {args.runtime}, "
          f"{world} ranks ({args.layout}), 1 thread per rank; peak above the step's "
          f"start ({'live tensor bytes' if args.runtime == 'eager' else 'allocator bytes'})")
    print("| tokens | peak per rank (MiB) | one process (MiB) | step, ranks (s) | "
          "one process, 1 thread (s) | one process, "
          f"{world} threads (s) |")
    print("|---|---|---|---|---|---|")
    for seq_len, peak, single, seconds in rows:
        print(f"| {seq_len} | {peak / mib:.1f} | {single['peak'] / mib:.1f} | {seconds:.3f} | "
              f"{single[1]:.3f} | {single[world]:.3f} |")
    if len(rows) >= 2:
        (s1, p1, one1, _), (s2, p2, one2, _) = rows[0], rows[-1]
        ranks = (p2 - p1) / (s2 - s1)
        single = (one2["peak"] - one1["peak"]) / (s2 - s1)
        print(f"\ngrowth per token of the whole sequence: {ranks / 1024:.2f} KiB per rank, "
              f"{single / 1024:.2f} KiB on one process: ratio {ranks / single:.3f} "
              f"(target <= 1.25/P = {1.25 / world:.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    parser.add_argument("--runtime", default="eager", choices=("eager", "inductor"))
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--seq-lens", default="1024,2048",
                        type=lambda text: [int(s) for s in text.split(",")])
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.measure:
            measure(args, rank, world)
        else:
            check(args, rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
