#!/usr/bin/env bash
# The engine on the GPU machine: a short streamed run with a timeline, the engine's GPU tests
# (bounded memory, budget, bf16), then the harness for slidejax (24 GB budget) and the
# all-resident peak at 16K and 64K tokens per step. Logs in $OUT/log.txt.
set -o pipefail
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
step setup
source bench/device_setup.sh >>"$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
LAYERS=${LAYERS:-8}
step "engine streamed, 4 layers, 16K tokens, trace"
timeout 120 python3 bench/bench_engine.py --layers 4 --tokens-per-step 16384 --steps 2 --warmup 2 \
    --out "$OUT/e16.json" --trace "$OUT/trace16.json" >>"$LOG" 2>&1; tail -1 "$LOG"
if [ -n "${TESTS:-}" ]; then
    step "engine GPU tests"
    timeout 240 python3 -m pytest -q -x -s -m gpu tests/test_engine_gpu.py >>"$LOG" 2>&1; grep -E "peak GPU|passed|failed|Error" "$LOG" | tail -5
fi
step "harness: slidejax24 + resident, $LAYERS layers"
timeout 420 python3 bench/harness.py --out "$OUT/h" --systems "${SYSTEMS:-slidejax24,resident}" --layers "$LAYERS" \
    --tokens 16384,65536 --steps 3 --warmup 1 --timeout 160 >>"$LOG" 2>&1; tail -12 "$LOG"
step done
