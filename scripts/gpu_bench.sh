#!/usr/bin/env bash
# `rgemma bench` on a CUDA GPU: bf16, decode at batch 1 and 64, prefill of 1024
# and 4096 tokens, context growth against Gemma-2B; memory is each engine's
# torch.cuda.max_memory_allocated (the JSON also has peak RSS).
#
#   scripts/gpu_bench.sh [OUT_DIR]        # default gpu-bench/
#   PRESET=9b CONTEXT=1024,8192 scripts/gpu_bench.sh
#
# Writes OUT_DIR/bench.txt (the table), bench.json and bench.png (with matplotlib).
set -euo pipefail

out=${1:-gpu-bench}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: torch ' + torch.__version__)"
plot=()
if python -c "import matplotlib" 2>/dev/null; then
    plot=(--plot "$out/bench.png")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -m rgemma.cli bench --preset "${PRESET:-2b}" --device cuda --dtype bfloat16 \
    --prompt-lengths 1024,4096 --batch-sizes 1,64 --decode-steps "${STEPS:-32}" --warmup 4 --prefill-repeats 3 \
    --context-growth "${CONTEXT:-1024,4096,16384,32768}" \
    --json "$out/bench.json" "${plot[@]}" | tee "$out/bench.txt"
