#!/usr/bin/env bash
# The GPU tables of reports/performance.md, in one run on a machine with one CUDA GPU.
#
#   bash bench/studies/gpu_suite.sh OUT_DIR [STEP ...]       # all steps, or only those named
#
# Needs diffusers and torch-fidelity importable and the shared assets (../shared/assets, or
# DIFFUSION_SOLVERS_ASSETS).  Each step has its own time limit and writes its report and log under OUT_DIR;
# a step that fails or runs out of time does not stop the others.  OUT_DIR/suite.tgz is refreshed after
# every step, so a run cut short still leaves everything finished so far.
set -u
OUT=${1:?usage: bash bench/studies/gpu_suite.sh OUT_DIR [STEP ...]}
shift
STEPS=("$@")
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=""

pack() { tar czf "$OUT/suite.tgz.part" -C "$WORK" . && mv "$OUT/suite.tgz.part" "$OUT/suite.tgz"; }
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - START ))s)"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || FAILED="$FAILED $name"
    echo "    rc=$rc after +$(( $(date +%s) - START ))s"
    tail -n 4 "$WORK/$name.log" | sed 's/^/    /'
    pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
  python -c "import torch, diffusers, torch_fidelity; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'torch-fidelity', torch_fidelity.__version__)"
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

want() { [ ${#STEPS[@]} -eq 0 ] || [[ " ${STEPS[*]} " == *" $1 "* ]]; }

want gpu_check && step gpu_check 60 python -m bench.gpu_check --out "$WORK/gpu_check.md"
want e2e_b128 && step e2e_b128 150 python -m bench.perf e2e --device cuda --batch 128 --nfe 10,50 --repeats 3 --threads 4 \
    --variants "diffusers,ours,network alone,ours graph,diffusers bf16+CL,ours bf16+CL,network alone bf16+CL,ours bf16+CL graph,network alone bf16+CL graph" \
    --out "$WORK/perf_e2e_cuda_b128.md"
want overhead && step overhead 60 python -m bench.perf overhead --device cuda --methods ddim,ddpm,dpmpp_2m,dpmpp_3m,euler,heun \
    --batches 1,64,1024 --steps 20 --repeats 5 --setup-steps 20 --threads 4 --out "$WORK/perf_overhead_cuda.md"
want overhead_philox && step overhead_philox 60 python -m bench.perf overhead --device cuda --rng philox \
    --methods ddpm,ddim_eta1 --batches 1,64,1024 --steps 20 --repeats 5 --setup-steps 20 --threads 4 \
    --out "$WORK/perf_overhead_cuda_philox.md"
want e2e_b8 && step e2e_b8 50 python -m bench.perf e2e --device cuda --batch 8 --nfe 10,50 --repeats 3 --threads 4 --solvers dpmpp_2m \
    --variants "diffusers,ours,network alone,ours graph,network alone graph,ours bf16+CL graph,network alone bf16+CL graph" \
    --out "$WORK/perf_e2e_cuda_b8.md"
want scaling && step scaling 80 python -m bench.perf scaling --device cuda --model unet-random --metric fid --inception-random \
    --samples 1024,2048,4096,8192 --steps 5,10,20,40 --steps-samples 2048 --batch 512 --autocast bf16 --cuda-graph \
    --threads 4 --out "$WORK/perf_scaling_cuda.md"
want mnist && step mnist 70 python -m bench.run --model ddpm_mnist --solvers ddim,dpmpp --steps 10,50 --num-samples 10000 \
    --batch-size auto --cuda-graph --device cuda --quiet --out "$WORK/ddpm_mnist_cuda"
want profile && step profile 60 python -m bench.perf unet-profile --device cuda --batch 128 --top 8 \
    --variants float32,bf16,bf16+channels_last --threads 4 --out "$WORK/perf_unet_profile_cuda.md"
want compile && step compile 150 python -m bench.perf e2e --device cuda --batch 128 --nfe 10,50 --repeats 3 --threads 4 \
    --variants "diffusers,ours bf16+CL graph,ours compile+graph,network alone compile+graph,ours bf16 compile+graph,ours bf16+CL compile+graph,network alone bf16+CL compile+graph" \
    --out "$WORK/perf_e2e_cuda_compile.md"
cp "$WORK"/*.md "$OUT"/ 2>/dev/null
echo "=== done at +$(( $(date +%s) - START ))s${FAILED:+; failed or timed out:$FAILED}"
[ -z "$FAILED" ]
