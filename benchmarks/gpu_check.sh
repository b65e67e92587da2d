#!/usr/bin/env bash
# Issue 11's GPU figures in one go, for a session that is lent a GPU (run from the repository
# root; each part has its own time limit, 570 s in all, under the device tool's 600 s a call).
# Output goes to stdout and, when $OUT is set (the device tool), to $OUT/gpu_check.md.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-/tmp}/gpu_check.md"
{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo; echo "## Tiers on CUDA: equal to foreach, no synchronizing calls (tests/test_cuda.py)"
    (cd .. && timeout 120 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15)
    echo; echo "## AdamW bandwidth (bandwidth.py)"
    timeout 90 python bandwidth.py --device cuda --markdown
    echo; echo "## Step time, default and compiled (step_time.py)"
    timeout 240 python step_time.py --device cuda --compiled --markdown \
        --only adamw,adam,lion,nadam,ademamix,laprop,adan,adafactor,schedulefree_adamw,adamw8bit
    echo; echo "## Newton-Schulz methods (matrix_step_time.py)"
    timeout 120 python matrix_step_time.py --device cuda
} 2>&1 | tee "$out"
