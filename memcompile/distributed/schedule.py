"""Who holds which part of the sequence, which key/value chunks travel where, and what it costs.

The global sequence of `S` tokens is cut into equal chunks; every rank holds the same number.

- `"zigzag"` (the default): `2P` chunks, rank `r` holds chunks `r` and `2P-1-r`, in that order.
  Under the causal rule a query chunk sees every earlier key chunk whole and its own chunk as a
  triangle. Rank `r`'s early chunk sees `r` earlier chunks, its late chunk `2P-1-r`: `2P-1`
  whole blocks and two triangles on every rank, so every rank does the same attention work
  (largest over mean: 1.0 at any P).
- `"contiguous"`: `P` chunks, rank `r` holds chunk `r`: `r` whole blocks and a triangle, so the
  last rank does `(P - 1/2) / (P/2)` of the mean work (1.5 at P=2, 1.75 at P=4). It is the plain
  causal ring, kept as the baseline the balance is measured against.

The schedule is the same for both: after the local step, `P-1` steps; at step `s` rank `r` sends
its keys/values to `r+s` and receives from `r-s` (mod P). A message holds only the chunks its
receiver's queries see, which are always a prefix of the sender's chunks (those below the
receiver's last chunk). Why direct sends rather than a relay ring, where each rank forwards the
buffer it just received (ring-flash-attn): a relayed buffer must carry every chunk, since some
later rank may need it; a direct one carries what its receiver sees. In zigzag a higher rank sees
only a lower rank's early chunk, so a rank sends `P-1+r` chunks per forward instead of `2(P-1)`.

Why keys/values travel and not queries (LightSeq's helpers receive queries and return outputs):
a query's trip costs its `Hq·D` floats out and its output's `Hq·D` back, against `2·Hkv·D` for a
key/value pair, so keys/values never cost more in the forward with `Hq >= Hkv`. In the backward
keys/values go out and their gradients come back (`4·Hkv·D`) against queries, output gradients
and query gradients (`3·Hq·D`): keys/values cost less whenever `Hq > 4/3·Hkv`, i.e. for every
grouped-query model; plain multi-head attention would save a quarter of the backward's traffic
by shipping queries, which is not done.

Everything here is plain arithmetic on ranks and chunk indices, so it is tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("zigzag", "contiguous")
"""The sequence layouts (`check_layout`); the first is the default."""


@dataclass(frozen=True)
class Block:
    """One kernel call: the rank's query chunk `query` (position among its own chunks) against
    key chunk `key` (position in that step's key/value buffer), square-causal if `causal`."""

    query: int
    key: int
    causal: bool


def check_layout(layout: str) -> str:
    """`layout`, or a ValueError naming the valid ones."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return layout


def chunk_count(layout: str, world: int) -> int:
    """How many equal chunks the global sequence is cut into."""
    return 2 * world if check_layout(layout) == "zigzag" else world


def rank_chunks(layout: str, world: int, rank: int) -> tuple[int, ...]:
    """The global chunk indices rank `rank` holds, in the order it holds them (ascending)."""
    if check_layout(layout) == "zigzag":
        return (rank, 2 * world - 1 - rank)
    return (rank,)


def sent_chunks(layout: str, world: int, src: int, dst: int) -> int:
    """How many of `src`'s chunks (a prefix of them) some query of `dst` sees; 0 for `src == dst`
    (a rank's own chunks never travel)."""
    if src == dst:
        return 0
    last = max(rank_chunks(layout, world, dst))
    return sum(1 for chunk in rank_chunks(layout, world, src) if chunk < last)


def peers(world: int, rank: int, step: int) -> tuple[int, int]:
    """`(send_to, receive_from)` of `rank` at `step` (1 to P-1)."""
    return (rank + step) % world, (rank - step) % world


def step_keys(layout: str, world: int, rank: int, step: int) -> tuple[int, ...]:
    """Global indices of the key chunks `rank` holds at `step`: its own at step 0, those
    received from `rank - step` after."""
    if step == 0:
        return rank_chunks(layout, world, rank)
    src = peers(world, rank, step)[1]
    return rank_chunks(layout, world, src)[:sent_chunks(layout, world, src, rank)]


def blocks(layout: str, world: int, rank: int, step: int) -> list[Block]:
    """The kernel calls of `rank` at `step`: each own query chunk against each key chunk of
    the step's buffer (`step_keys`) at or before it."""
    keys = step_keys(layout, world, rank, step)
    return [Block(i, j, key == query)
            for i, query in enumerate(rank_chunks(layout, world, rank))
            for j, key in enumerate(keys) if key <= query]


def attention_work(layout: str, world: int, seq_len: int) -> list[int]:
    """Scored (query, key) pairs per rank over the schedule's blocks (`seq_len` global tokens):
    a whole block counts `c²`, a causal one `c(c+1)/2`, for chunk length `c`."""
    chunk = seq_len // chunk_count(layout, world)
    whole, triangle = chunk * chunk, chunk * (chunk + 1) // 2
    return [sum(triangle if b.causal else whole
                for step in range(world) for b in blocks(layout, world, rank, step))
            for rank in range(world)]


def work_imbalance(layout: str, world: int, seq_len: int) -> float:
    """Attention work of the busiest rank over the mean (1.0 is perfect balance)."""
    work = attention_work(layout, world, seq_len)
    return max(work) / (sum(work) / len(work))


def schedule_bytes(layout: str, world: int, rank: int, *, batch: int, kv_heads: int,
                   seq_len: int, head_dim: int, itemsize: int,
                   grad_itemsize: int | None = None) -> dict[str, int]:
    """Bytes `rank` sends in one call, `{"forward": ..., "backward": ...}`: the forward sends
    keys/values; the backward sends them again (they are not kept) and returns the gradients
    of the keys/values it received, in `grad_itemsize` (the accumulation dtype's)."""
    grad_itemsize = itemsize if grad_itemsize is None else grad_itemsize
    pair = 2 * batch * kv_heads * (seq_len // chunk_count(layout, world)) * head_dim
    sent = sum(sent_chunks(layout, world, rank, (rank + s) % world) for s in range(1, world))
    got = sum(sent_chunks(layout, world, (rank - s) % world, rank) for s in range(1, world))
    return {"forward": sent * pair * itemsize,
            "backward": sent * pair * itemsize + got * pair * grad_itemsize}


def allgather_bytes(world: int, *, batch: int, kv_heads: int, seq_len: int, head_dim: int,
                    itemsize: int) -> dict[str, int]:
    """Bytes per rank of the all-gather alternative (Megatron-style; torch's context parallel
    by default): the forward all-gathers keys/values, the backward gathers them again and
    reduce-scatters their gradients; a ring collective sends `(P-1)/P` of the whole per rank."""
    whole = 2 * batch * kv_heads * seq_len * head_dim * itemsize * (world - 1) // world
    return {"forward": whole, "backward": 2 * whole}


def ulysses_bytes(world: int, *, batch: int, heads: int, kv_heads: int, seq_len: int,
                  head_dim: int, itemsize: int) -> dict[str, int]:
    """Bytes per rank of DeepSpeed-Ulysses: all-to-alls move each rank's `(P-1)/P` of its shard
    of q, k, v and the output in the forward, and of the output's, q's, k's and v's gradients in
    the backward (it needs `kv_heads` divisible by P, or key/value heads repeated)."""
    per_token = (2 * heads + 2 * kv_heads) * head_dim * itemsize
    moved = batch * seq_len // world * per_token * (world - 1) // world
    return {"forward": moved, "backward": moved}
