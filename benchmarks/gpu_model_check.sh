#!/usr/bin/env bash
# Prepared GPU check for the model path (issue 11's GPU row) and context parallelism's local
# attention (issue 15's). Installs nothing; runs from the tree. At most 9.5 minutes on one
# H100/H200 (one device call), each step under its own timeout (a failed or stopped step is
# reported and the run goes on):
#   1. benchmarks/model_check.py in bf16: dense limit = original (eager, compiled); every MoBA
#      call of a prefill and of generate() (dynamic, static cache) = the dense MoBA reference on
#      its own inputs; fp32 logits (eager, compiled, generate steps) = the CPU fp32 run.
#   2. benchmarks/bench_model.py: issue 11's GPU model (bf16, 8 layers, 8 heads of dim 128,
#      hidden 1024), dense vs MoBA in one process: prefill eager / torch.compile at 32K and 128K,
#      peak memory, decode ms/token through generate() (dynamic and static cache) after 128K.
#   3. benchmarks/bench_decode.py: decode steps at a 128K static cache under
#      torch.compile(mode="reduce-overhead") (CUDA graphs), dense vs MoBA (issue 11: >= 4x).
#   4. benchmarks/bench_cp_local.py: one rank's local attention under context parallelism (128K
#      over 4 ranks, bf16), the torch vs the Triton kernels, which must agree.
# Steps 1-3 need transformers >= moba-rewrite's floor: the image had 5.17.0 (2026-11), so carry
# the wheels that benchmarks/fetch_gpu_wheels.sh downloads: run(..., carry=[".whl"]).
#   usage: benchmarks/gpu_model_check.sh            (on the GPU machine; JSON to $OUT when set)
#          benchmarks/gpu_model_check.sh --dry-run  (the same steps on this CPU at toy sizes)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
out_dir="${OUT:-/tmp}"
device=cuda dtype=bfloat16 seqs=32768,131072 cache_len=131072 layers=8 hidden=1024 heads=8 head_dim=128
compile_mode=reduce-overhead
if [ "${1:-}" = "--dry-run" ]; then
    device=cpu dtype=float32 seqs=1024,2048 cache_len=2048 layers=2 hidden=128 heads=2 head_dim=64
    compile_mode=default
fi
echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?') device=$device dtype=$dtype"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
source benchmarks/gpu_packages.sh  # a newer transformers from the carried .whl/ when the image's is too old
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if [ "$HF_OK" = 0 ] && [[ "$name" != *bench_cp_local* ]]; then
        echo "== $name: skipped (needs a supported transformers)"
        status=1
        return 0
    fi
    timeout -k 10 "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "== $name: stopped by its ${limit}s timeout (partial results above)"
    [ $rc -ne 0 ] && { echo "== $name: rc=$rc"; status=1; }
    return 0
}

step "correctness (model_check)" 120 python benchmarks/model_check.py --device "$device" --dtype "$dtype"
step "whole model, dense vs MoBA (bench_model)" 250 python benchmarks/bench_model.py --device "$device" \
    --dtype "$dtype" --layers "$layers" --hidden "$hidden" --heads "$heads" --head-dim "$head_dim" --seq "$seqs" \
    --modes eager,compile --decode-tokens 16 --repeat 2 --json "$out_dir/bench_model_gpu.json"
step "compiled static-cache decode (bench_decode)" 130 python benchmarks/bench_decode.py --device "$device" \
    --dtype "$dtype" --static-layers "$layers" --hidden "$hidden" --heads "$heads" --head-dim "$head_dim" \
    --cache-len "$cache_len" --caches static --compile "$compile_mode" --steps 16
cp_args=(--device "$device" --dtype "$dtype" --tokens 131072 --world 4)
[ "$device" = cpu ] && cp_args=(--dry-run)
step "context parallelism, one rank's local attention (bench_cp_local)" 70 python benchmarks/bench_cp_local.py \
    "${cp_args[@]}"
exit $status
