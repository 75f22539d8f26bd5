#!/usr/bin/env bash
# StreamBP on one CUDA GPU, in one go (a lent GPU's time is short):
#   1. kernel and gradient checks (benchmarks/cuda_check.py);
#   2. wide's peak per length for per-layer checkpointing, stream, and stream holding 2 layer
#      inputs (bfloat16: float32 attention with grouped heads has no fused CUDA kernel);
#   3. each mode's line fitted, and the longest lengths under 2 GiB above weights and gradients
#      run once to confirm them.
# Usage, from the repository root: OUT=<dir> bash benchmarks/cuda_stream.sh
# Runs from the checkout (no install): the package is assembled under /tmp/site.
set -uo pipefail
OUT=${OUT:-bench_out/cuda}
# Overridable for a dry run of the script itself (DEVICE=cpu MODEL=tiny LENS=256,512 LIMIT_GIB=0.01)
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-wide} DTYPE=${DTYPE:-bfloat16}
LENS=${LENS:-8192,16384,32768,65536} LIMIT_GIB=${LIMIT_GIB:-2}
mkdir -p "$OUT"
rm -rf /tmp/site && mkdir -p /tmp/site && cp -r memcompile /tmp/site/ \
    && cp -r passes /tmp/site/memcompile/passes && cp -r runtime /tmp/site/memcompile/runtime
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

if [ "$DEVICE" = cuda ]; then
    timeout 150 python3 benchmarks/cuda_check.py 2>&1 | grep -v Warning | tee "$OUT/check.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "cuda_check failed: no bench on wrong gradients"; exit 1; }
fi

# From /tmp: run as a module from the checkout, `memcompile` would be the source folder, which
# lacks the passes and runtime packages the install maps into it.
OUT=$(realpath "$OUT")
BENCH="python3 -m memcompile.cli bench --model $MODEL --device $DEVICE --dtype $DTYPE"
(cd /tmp && timeout 240 $BENCH --seq-lens $LENS --modes checkpoint,stream,stream_c2 \
    --repeat 2 --jobs 4 --timeout 220 --out "$OUT/wide")
python3 benchmarks/stream_fit.py "$OUT/wide/results.json" --limit-gib $LIMIT_GIB | tee "$OUT/fit.md"

# The fitted longest lengths (rounded down to 1,024) for checkpointing and stream_c2.
lengths=$(python3 - "$OUT/wide/results.json" "$LIMIT_GIB" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from stream_fit import fit
rows = json.load(open(sys.argv[1]))["rows"]
out = []
for mode in ("checkpoint", "stream_c2"):
    got = sorted((r["tokens"], r["peak_bytes"] - r["param_bytes"]) for r in rows
                 if r["mode"] == mode and r.get("ok"))
    intercept, slope = fit([t for t, _ in got], [p for _, p in got])
    out.append(int((float(sys.argv[2]) * 2**30 - intercept) / slope) // 1024 * 1024)
print(",".join(map(str, sorted(set(out)))))
PY
)
echo "fitted longest lengths (checkpoint, stream_c2): $lengths"
[ -n "$lengths" ] || { echo "no fitted lengths (did the bench fail?)"; exit 1; }
(cd /tmp && timeout 260 $BENCH --seq-lens "$lengths" --modes checkpoint,stream_c2 \
    --repeat 1 --jobs 2 --timeout 250 --out "$OUT/long")
python3 - "$OUT/long/results.json" "$LIMIT_GIB" <<'PY' | tee -a "$OUT/fit.md"
import json, sys
limit = float(sys.argv[2])
print(f"\n| mode | tokens | MiB above weights+grads | under {limit:g} GiB | step s |\n|---|---|---|---|---|")
for r in json.load(open(sys.argv[1]))["rows"]:
    if not r.get("ok"):
        print(f"| `{r['mode']}` | {r['tokens']} | failed: {str(r.get('error'))[:200]} | | |")
        continue
    above = r["peak_bytes"] - r["param_bytes"]
    print(f"| `{r['mode']}` | {r['tokens']} | {above / 2**20:,.1f} | {above <= limit * 2**30} | "
          f"{r['seconds']:.2f} |")
PY
rm -f "$OUT"/*/bench.png
