#!/bin/bash
# One device call: install the carried wheels, then run the named benchmarks, each in its own
# process under its own time limit. Results: $OUT/*.json (rewritten after every measurement)
# and $OUT/all.log.   Usage: bash bench/run_gpu.sh train_ref train_project embed recaption
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .carry/wheels/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 BENCH_TMP=/tmp/bench
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$OUT/all.log"
python3 -c "import torch, transformers, diffusers, peft; print(torch.__version__, transformers.__version__, diffusers.__version__, peft.__version__)" 2>&1 | tee -a "$OUT/all.log"
for step in "$@"; do
  echo "=== $step $(date +%T)" | tee -a "$OUT/all.log"
  case $step in
    train_ref)     timeout "${REF_S:-180}" python3 bench/train_bench.py ref ;;
    train_project) timeout "${PROJECT_S:-420}" python3 bench/train_bench.py project ;;
    embed)         timeout "${EMBED_S:-200}" python3 bench/embed_bench.py ;;
    recaption)     timeout "${RECAPTION_S:-330}" python3 bench/recaption_bench.py .carry/llava336 ;;
  esac 2>&1 | grep -v "should be kept in float32" | tee -a "$OUT/all.log" | grep -E "^RESULT|Error|error|^done|Traceback" | cut -c1-700
done
echo "=== end $(date +%T)"
