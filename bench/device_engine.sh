#!/usr/bin/env bash
# The engine on the GPU machine, in one call: several bench_engine.py runs (each "name: args" line
# of $CASES, default below; CASES="" runs none), then optionally (TESTS=1) the engine's GPU tests. Results go to
# $OUT/engine.jsonl (one JSON object per run, with its name), the full log to $OUT/log.txt, traces
# to wherever the case's --trace points (keep them under $OUT).
set -o pipefail
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
step setup
source bench/device_setup.sh >>"$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
CASES=${CASES-"s16: --layers 8 --tokens-per-step 16384 --gpu-memory 24GB"}
while IFS= read -r line; do
    [ -z "$line" ] && continue
    name=${line%%:*}; args=${line#*:}
    step "$name:$args"
    # shellcheck disable=SC2086
    timeout "${CASE_TIMEOUT:-200}" python3 bench/bench_engine.py --steps "${STEPS:-3}" --warmup 2 $args \
        --out "/tmp/$name.json" >>"$LOG" 2>&1
    rc=$?
    tail -1 "$LOG"
    [ -f "/tmp/$name.json" ] && python3 -c "import json,sys; d=json.load(open('/tmp/$name.json')); d['case']='$name'; print(json.dumps(d))" >> "$OUT/engine.jsonl"
    [ $rc -ne 0 ] && echo "  (exit $rc)" | tee -a "$LOG"
done <<< "$(echo "$CASES" | tr ';' '\n')"
if [ -n "${TESTS:-}" ]; then
    step "engine GPU tests"
    timeout 300 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py >>"$LOG" 2>&1
    grep -E "peak GPU|passed|failed|Error" "$LOG" | tail -6
fi
step done
