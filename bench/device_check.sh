#!/usr/bin/env bash
# First-contact check on the GPU machine: set-up, a short engine run (streamed and all-resident)
# with a timeline, the host-optimizer benchmark and the kernels' GPU tests. Everything is logged
# to $OUT/log.txt; results as JSON beside it. Run from the repository root with .whl carried.
set -o pipefail
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
step setup
source bench/device_setup.sh >>"$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee -a "$LOG"
echo "cores $(nproc); $(free -g | awk '/Mem/{print $2" GB RAM"}')" | tee -a "$LOG"
LAYERS=${LAYERS:-4}
step "engine streamed, $LAYERS layers, 16K tokens"
timeout 240 python3 bench/bench_engine.py --layers "$LAYERS" --tokens-per-step 16384 --steps 3 --warmup 2 \
    --out "$OUT/e16.json" --trace "$OUT/trace16.json" >>"$LOG" 2>&1; tail -2 "$LOG"
step "engine all-resident, $LAYERS layers, 16K tokens"
timeout 200 python3 bench/bench_engine.py --layers "$LAYERS" --tokens-per-step 16384 --steps 3 --warmup 2 \
    --resident --out "$OUT/r16.json" >>"$LOG" 2>&1; tail -2 "$LOG"
step "host optimizer"
timeout 150 python3 bench/bench_host_optimizer.py --out "$OUT/hostopt" >>"$LOG" 2>&1; tail -14 "$LOG"
step "kernel GPU tests"
timeout 200 python3 -m pytest -q -x -m gpu tests/test_linear_cross_entropy_gpu.py >>"$LOG" 2>&1; tail -8 "$LOG"
step done
