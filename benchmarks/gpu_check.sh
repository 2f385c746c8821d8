#!/usr/bin/env bash
# Prepared GPU check for the Triton MoBA kernels (issue 5). Installs nothing; runs from the tree.
# About 6 minutes on one H100/H200: a launch-config sweep (the fastest configs are kept for the
# run; paste the printed MOBA_TRITON_CONFIG into triton_configs' defaults when they win), bf16
# correctness vs the dense reference on mid-size shapes, then
# time / TFLOP/s / peak memory of ours vs SDPA (flash) vs our torch backend, fwd and fwd+bwd,
# and decode at 128K. Every case is guarded (an error is printed, the run goes on); cases that
# would overrun the time budget are skipped with a note. Last, context parallelism's local
# attention on one rank's problem (128K over 4 ranks), torch vs Triton kernels (bench_cp_local.py).
#   usage: benchmarks/gpu_check.sh [--budget SECONDS] [--skip-correctness]
# Results are also written as JSON to $OUT/bench_gpu.json when $OUT is set (else /tmp).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
out_dir="${OUT:-/tmp}"
timeout -k 10 440 python benchmarks/bench_gpu.py --sweep 150 --budget 390 --json "$out_dir/bench_gpu.json" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: stopped by the 440 s timeout (partial results above)"
echo "== context parallelism, one rank's local attention (bench_cp_local, limit 90s)"
timeout -k 10 90 python benchmarks/bench_cp_local.py --device cuda --dtype bfloat16 --tokens 131072 --world 4
rc_cp=$?
[ $rc_cp -ne 0 ] && echo "== bench_cp_local: rc=$rc_cp"
[ $rc -eq 0 ] && rc=$rc_cp
exit $rc
