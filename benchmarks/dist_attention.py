"""Distributed causal attention on gloo ranks: bytes per rank, work balance, time.

One attention layer, forward and backward, of `(B, Hq, S, D)` queries over `(B, Hkv, S, D)`
keys/values sharded over P spawned gloo ranks (one thread each) in both layouts, against
`scaled_dot_product_attention(..., is_causal=True)` in one process. Prints two markdown tables:

- bytes each rank sent (counted by `count_bytes`), largest and mean over ranks, beside the
  schedule's analytic volume and the analytic volumes of the all-gather alternative and of
  Ulysses for the same shape, and the attention work of the busiest rank over the mean;
- median seconds of forward + backward: single process with 1 thread and with as many threads
  as ranks, and the ranks (the slowest rank per repetition).

    python benchmarks/dist_attention.py --seq-len 4096 --heads 16 --kv-heads 4 --head-dim 64 \\
        --worlds 2 4
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from memcompile.distributed import count_bytes, dist_causal_attention, shard_sequence
from memcompile.distributed import schedule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _inputs(args: argparse.Namespace) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    return [torch.randn(args.batch, h, args.seq_len, args.head_dim, generator=generator,
                        dtype=dtype) for h in (args.heads, args.kv_heads, args.kv_heads,
                                               args.heads)]


def _rank(rank: int, world: int, port: int, layout: str, args: argparse.Namespace,
          results: mp.Queue) -> None:
    """One rank: time `args.repeat` forward+backward calls (after one warm-up) and count one
    call's bytes; rank 0 reports the slowest rank's median, every rank its bytes."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    q, k, v, grad = (shard_sequence(t, 2, layout=layout) for t in _inputs(args))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def step() -> None:
        dist_causal_attention(*leaves, layout=layout).backward(grad)

    with count_bytes() as sent:
        step()
    times = []
    for _ in range(args.repeat):
        dist.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    results.put((rank, sent.forward, sent.backward, statistics.median(times)))
    dist.destroy_process_group()


def run_ranks(world: int, layout: str, args: argparse.Namespace) -> list[tuple]:
    """`(rank, forward bytes, backward bytes, median seconds)` per rank."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(r, world, port, layout, args, results))
                 for r in range(world)]
    for process in processes:
        process.start()
    answers = sorted(results.get(timeout=1800) for _ in range(world))
    for process in processes:
        process.join()
    return answers


def single_process(args: argparse.Namespace, threads: int) -> float:
    """Median seconds of SDPA forward + backward on the whole sequence with `threads` threads."""
    torch.set_num_threads(threads)
    q, k, v, grad = _inputs(args)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def step() -> None:
        F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True).backward(grad)

    step()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    """Run every world size and layout, then print the two tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    itemsize = DTYPES[args.dtype].itemsize
    shape = dict(batch=args.batch, kv_heads=args.kv_heads, seq_len=args.seq_len,
                 head_dim=args.head_dim, itemsize=itemsize)
    volume_rows, time_rows = [], []
    for world in args.worlds:
        gather = schedule.allgather_bytes(world, **shape)
        ulysses = schedule.ulysses_bytes(world, heads=args.heads, **shape)
        for layout in schedule.LAYOUTS:
            answers = run_ranks(world, layout, args)
            grad_itemsize = torch.promote_types(DTYPES[args.dtype], torch.float32).itemsize
            analytic = [sum(schedule.schedule_bytes(layout, world, r, grad_itemsize=grad_itemsize,
                                                    **shape).values()) for r in range(world)]
            sent = [fwd + bwd for _, fwd, bwd, _ in answers]
            volume_rows.append(
                f"| {world} | {layout} | {_mib(max(a[1] for a in answers))} | "
                f"{_mib(max(a[2] for a in answers))} | {_mib(max(sent))} | "
                f"{_mib(statistics.mean(sent))} | {_mib(statistics.mean(analytic))} | "
                f"{_mib(sum(gather.values()))} | {_mib(sum(ulysses.values()))} | "
                f"{schedule.work_imbalance(layout, world, args.seq_len):.3f} |")
            time_rows.append(f"| {world} ranks, {layout} | {answers[0][3]:.3f} |")
    singles = [f"| 1 process, {threads} thread(s) | {single_process(args, threads):.3f} |"
               for threads in sorted({1, *args.worlds})]
    time_rows = singles + time_rows
    print(f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
          f"S={args.seq_len}, {args.dtype}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| P | layout | forward MiB (max rank) | backward MiB (max rank) | total MiB (max) | "
          "total MiB (mean) | schedule, analytic (mean) | all-gather, analytic | "
          "Ulysses, analytic | work max/mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(volume_rows))
    print("\n| forward + backward | median s |\n|---|---|")
    print("\n".join(time_rows))


if __name__ == "__main__":
    main()
