#!/usr/bin/env bash
# Every GPU benchmark in one call, for a GPU machine lent for minutes (see README, "Measured results").
#
#   OUT=bench_out bash scripts/gpu_bench.sh
#
# Installs surgeon beside the machine's own torch and Triton (no dependency resolution, so a CUDA
# build is kept), prints the GPU, then runs `surgeon bench --device cuda --dtype bfloat16 --generate`: the
# generation table (bf16, per generated token), the whole-model table, the LoRA kernel table and the
# adapter-family table, then benchmarks/bench_mixed_kernels.py (the mixed-batch LoRA kernels: decode and
# prefill, batch 16, rows over 1 / 4 / 16 adapters). Writes under $OUT: bench_generate.json, bench_mixed_kernels.json,
# bench.txt (everything printed), bench.json, bench_kernels.json, bench_family.json and
# tuning.json (the strategy each shape bucket picked). About 6-7 minutes in all with the default
# BUDGET=150 (seconds per kernel table). Exits non-zero only when there is no CUDA device or the
# install fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
$PY -m pip install -q -e . --no-deps --no-build-isolation >"$OUT/install.log" 2>&1 \
  || { echo "gpu_bench: installing surgeon failed (see $OUT/install.log)"; exit 1; }
$PY - <<'PY' || exit 1
import torch, triton
if not torch.cuda.is_available():
    raise SystemExit("gpu_bench: no CUDA device here")
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
PY
export SURGEON_TUNE_CACHE="$OUT/tuning.json" TRITON_DEFAULT_FP_FUSION=1
start=$(date +%s)
# each kernel table starts no new row after BUDGET seconds (the tuner compiles and times every
# strategy once per shape bucket, so the first rows of a table take longest)
$PY -m surgeon bench --device cuda --dtype bfloat16 --rounds 20 --generate --kernel-budget "${BUDGET:-150}" \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
# the mixed-batch LoRA kernels on one 4096 x 4096 linear: decode and prefill, batch 16, 1 / 4 / 16 adapters
$PY benchmarks/bench_mixed_kernels.py --dtype bfloat16 --rounds 30 --json "$OUT/bench_mixed_kernels.json" 2>&1 \
  | tee -a "$OUT/bench.txt"
echo "gpu_bench: $(( $(date +%s) - start )) s; files in $OUT"
