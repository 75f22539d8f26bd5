"""Peak and step time of one streamed training step of a Hugging Face Llama with padding.

transformers builds a `(batch, 1, T, T)` mask when `attention_mask` pads a row; StreamBP splits it
into the causal kernel and a `(batch, 1, 1, T)` mask over keys (`passes/key_mask.py`). This
measures the step with a padded batch: 2 rows of `--seq-len` tokens, the first left-padded by
`--pad` tokens (4 layers, hidden 512, intermediate 1408, 8 heads, vocabulary 32000; float32; the
CPU allocator's peak above the weights and the batch).

    python benchmarks/stream_padding.py --seq-len 4096 --pad 1024
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import memcompile
from memcompile.models import build_hf_model


def main() -> None:
    """Print one JSON line: length, padding, peak MiB, step seconds (after a compile step)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--pad", type=int, default=1024)
    args = parser.parse_args()
    model = build_hf_model("llama", num_hidden_layers=4, hidden_size=512,
                           intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8,
                           vocab_size=32000)
    ids = torch.randint(0, 32000, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :args.pad] = 0
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": ids.masked_fill(mask == 0, -100)}
    loss = torch.compile(lambda **b: model(**b).loss, backend="memcompile",
                         options={"runtime": "eager", "stream": True})

    def step() -> None:
        loss(**batch).backward()
        model.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    result = memcompile.measure(step, warmup=0, repeat=1, method="allocator")
    print(json.dumps({"torch": torch.__version__, "seq_len": args.seq_len, "pad": args.pad,
                      "peak_mib": round(result.peak_bytes / 2**20, 1),
                      "step_s": round(result.seconds, 1), "first_step_s": round(first, 1)}))


if __name__ == "__main__":
    main()
