#!/usr/bin/env bash
# The whole GPU performance check of mindvis in one script (about 8 minutes on one H100/H200-class GPU).
#
#   bash benchmarks/gpu.sh            # results in benchmarks/results/ (and copied to $OUT when set)
#
# 1. MBM `large` training steps, batch 100: fp32 and bf16 autocast, fused SDPA attention against the unfused
#    (math) kernel, fused AdamW; model FLOP utilisation against a bf16 / fp32 8192^3 matmul measured in the
#    same run (target: bf16 MFU >= 40%).
# 2. The same bf16 step under torch.compile.
# 3. Stage B cond-only training at label2img size (batch 8): fp32 / bf16, contiguous / channels-last.
# 4. UNet throughput at label2img size: one sampler step for 1 fMRI x 5 samples and for a batch of 50, fp32 /
#    bf16 weights, contiguous / channels-last, and the estimated time of the 50-item test set per sampler.
# 5. A profile of the bf16 MBM step (top CUDA kernels).
#
# Each part has its own time limit, so one slow part cannot eat the others' time. Without a CUDA device the
# script says so and exits with status 2, having measured nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" - <<'PYEOF'
import sys
try:
    import torch
except ImportError:
    print("gpu.sh: torch is not importable with this python", file=sys.stderr)
    sys.exit(1)
if not torch.cuda.is_available():
    sys.exit(1)
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
then
    echo "gpu.sh: no CUDA device is visible to torch; this check needs a GPU, nothing was measured" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
RES=benchmarks/results
mkdir -p "$RES"
START=$(date +%s)
MARK=$(mktemp)
LOG="$RES/gpu-$(date -u +%Y%m%dT%H%M%SZ).log"
FAILED=()

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s)" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc, $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$LOG" || true

part mbm 150 "$PY" benchmarks/bench_mbm.py --device cuda --variants large --precisions fp32,bf16 \
    --attentions fused,math --steps 15 --warmup 3 --max-wait 0
part mbm-compile 150 "$PY" benchmarks/bench_mbm.py --device cuda --variants large --precisions bf16 \
    --compile --steps 15 --warmup 3 --max-wait 0
part stage-b 100 "$PY" benchmarks/bench_stage_b.py --sizes label2img --label2img-batch 8 --steps 8 --warmup 2 \
    --precisions fp32,bf16 --memory-formats contiguous,channels_last
part sampling 90 "$PY" benchmarks/bench_sampling.py --sizes --label2img --label2img-batch 50 --repeat 5 \
    --label2img-variants fp32,bf16,bf16-channels_last --e2e-variant bf16
part profile 45 "$PY" benchmarks/profile_steps.py --device cuda --what mbm --bf16 --mbm-batch 100 --rows 20

echo "total $(( $(date +%s) - START )) s; log: $LOG" | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    # everything this run wrote, as one archive, plus the log and the tables (a device machine returns 8 files)
    find "$RES" -maxdepth 1 -type f -newer "$MARK" -printf '%f\n' | tar -czf "$OUT/gpu-results.tgz" -C "$RES" -T -
    cp "$LOG" "$OUT"/
    find "$RES" -maxdepth 1 -name '*.md' -newer "$MARK" | head -5 | xargs -r cp -t "$OUT"
fi
rm -f "$MARK"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed or timed out: ${FAILED[*]}" >&2
    exit 1
fi
