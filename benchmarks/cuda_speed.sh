#!/usr/bin/env bash
# StreamBP's step time on one CUDA GPU against per-layer checkpointing (issue 18), in one go (a
# lent GPU's time is short, about 15 minutes with its start):
#   1. kernel and gradient checks (benchmarks/cuda_check.py): no timing of wrong gradients;
#   2. wide in bfloat16 at 65,536 tokens: checkpointing, and StreamBP every input held
#      (`stream`) under the old runtime (`runtime="eager"`: chunk bodies op by op in Python,
#      chunks of 1,024 tokens) and the new (the default Inductor runtime: compiled chunk
#      bodies, `chunk_size="auto"`), the new also with attention outputs kept (`stream_keep`)
#      and with 2 inputs held (`stream_c2`), side by side: peak, step time and kernel launches
#      per step (`memcompile.measure_calls`);
#   3. the offload plan against the recompute-only one, if `benchmarks/offload_cuda.py` exists.
# Usage, from the repository root: OUT=<dir> bash benchmarks/cuda_speed.sh
# Runs from the checkout with the machine's own torch (no install: the lent machine reaches no
# package index; its image had torch 2.11, below the package's declared range, and the script
# prints the version it ran with). The package is assembled under /tmp/site.
set -uo pipefail
OUT=${OUT:-bench_out/cuda-speed}
# Overridable for a dry run of the script itself (DEVICE=cpu DTYPE=float32 MODEL=tiny LENS=512)
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-wide} DTYPE=${DTYPE:-bfloat16} LENS=${LENS:-65536}
mkdir -p "$OUT"
rm -rf /tmp/site && mkdir -p /tmp/site && cp -r memcompile /tmp/site/ \
    && cp -r passes /tmp/site/memcompile/passes && cp -r runtime /tmp/site/memcompile/runtime
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee "$OUT/versions.txt"

if [ "$DEVICE" = cuda ]; then
    timeout 150 python3 benchmarks/cuda_check.py 2>&1 | grep -v Warning | tee "$OUT/check.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "cuda_check failed: no timing of wrong gradients"; exit 1; }
fi

# From an empty folder: run as a module from the checkout, `memcompile` would be the source
# folder, which lacks the passes and runtime packages the install maps into it (and a stray
# module in /tmp could shadow the standard library's).
OUT=$(realpath "$OUT") ROOT=$(pwd) RUN=$(mktemp -d)
BENCH="python3 -m memcompile.cli bench --model $MODEL --device $DEVICE --dtype $DTYPE --seq-lens $LENS --repeat 2"
# One job at a time: the modes time the same GPU. Timeouts keep the whole under 10 minutes.
(cd "$RUN" && timeout 140 $BENCH --modes checkpoint,stream \
    --options '{"runtime": "eager", "stream": {"chunk_size": 1024}}' \
    --jobs 1 --timeout 130 --out "$OUT/old")
(cd "$RUN" && timeout 300 $BENCH --modes stream,stream_keep,stream_c2 --jobs 1 --timeout 290 \
    --out "$OUT/new")

python3 - "$OUT" <<'PY' | tee "$OUT/speed.md"
import json, sys
out = sys.argv[1]
rows = []
for run in ("old", "new"):
    try:
        rows += [(run, r) for r in json.load(open(f"{out}/{run}/results.json"))["rows"]]
    except (OSError, ValueError) as e:
        print(f"{run}: no results ({e})")
base = {r["tokens"]: r for run, r in rows if r["mode"] == "checkpoint" and r.get("ok")}
print("| runtime | mode | tokens | MiB above weights | step s | x checkpoint | calls | x checkpoint |")
print("|---|---|---|---|---|---|---|---|")
for run, r in rows:
    if not r.get("ok"):
        print(f"| {run} | `{r['mode']}` | {r['tokens']} | failed: {str(r.get('error'))[:200]} | | | | |")
        continue
    b = base.get(r["tokens"])
    ratio = lambda key: f"{r[key] / b[key]:.2f}" if b and b.get(key) and r.get(key) else ""
    above = (r["peak_bytes"] - r["param_bytes"]) / 2**20
    print(f"| {run if r['mode'] != 'checkpoint' else ''} | `{r['mode']}` | {r['tokens']} | "
          f"{above:,.1f} | {r['seconds']:.2f} | {ratio('seconds')} | {r.get('calls', '')} | "
          f"{ratio('calls')} |")
PY

# The device tool gives one command at most 10 minutes: offload runs only if time is left.
if [ "$SECONDS" -gt 360 ]; then
    echo "offload skipped: ${SECONDS}s used; run it alone: python3 benchmarks/offload_cuda.py --seq-len 32768"
elif [ -f benchmarks/offload_cuda.py ] && [ "$DEVICE" = cuda ]; then
    (cd "$RUN" && timeout 200 python3 "$ROOT/benchmarks/offload_cuda.py" --seq-len 32768) \
        2>&1 | tee "$OUT/offload.jsonl"
fi
rm -f "$OUT"/*/bench.png
