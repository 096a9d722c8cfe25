#!/usr/bin/env bash
# Run every benchmark on a CUDA device, with settings meant to finish in under 8 minutes on one current
# datacenter GPU (24 GB or more). NOT yet run on CUDA: written and checked on a CPU-only machine, where each
# command was run with the same flags on tiny settings (SMOKE=1 below).
#
# Usage: bash bench/run_all_cuda.sh                 (DEVICE=cuda:1, OUT=dir, THREADS=n to change)
#        SMOKE=1 DEVICE=cpu bash bench/run_all_cuda.sh   (same commands, tiny models and sizes: a plumbing check)
#
# Results go to $OUT (default bench/results/cuda/), one JSON per benchmark. Not run here: SD3.5-large (16 GB in
# fp16) and FLUX.1-dev (24 GB in fp16) timing; bench_memory.py computes their memory instead.
# bench_vs_daam.py needs the DAAM environment (bash bench/setup_daam_venv.sh installs a CPU torch there: for
# DAAM on CUDA, install a CUDA build of torch 2.13.0 into it first, e.g. TORCH_WHEEL_DIR with the CUDA wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-bench/results/cuda}"
THREADS="${THREADS:-4}"
export PYTHONPATH="${PYTHONPATH:-$PWD/src}"
mkdir -p "$OUT"
start=$SECONDS
failed=()
step() { echo "== $* ($((SECONDS - start)) s so far)" >&2; }
run() {  # run one benchmark; a failure is reported at the end and does not stop the others
    "$@" || { echo "FAILED (exit $?): $*" >&2; failed+=("$2"); }
}

if [ "${SMOKE:-0}" = 1 ]; then
    SDXL=tiny:sdxl SD35=tiny:sd3.5 FSIZE=64 FSTEPS=2 SD2=tiny SIZE=64 STEPS=2 DSIZE=64 DSTEPS=2 OSIZE=64 EPOCHS=1
    DMODEL=tiny DTYPE=float32
else
    SDXL=sdxl-base SD35=sd3.5-medium FSIZE=1024 FSTEPS=10 SD2=sd2-base SIZE=512 STEPS=30 DSIZE=512 DSTEPS=30
    OSIZE=512 EPOCHS=5 DMODEL=sd2-base DTYPE=float16
fi

step "traced / untraced, SDXL base and SD3.5 medium (full size, random weights), $FSIZE px, $FSTEPS steps"
run python bench/bench_families.py --model "$SDXL" --size "$FSIZE" --steps "$FSTEPS" --rounds 3 --threads "$THREADS" \
    --device "$DEVICE" --dtype "$DTYPE" --out "$OUT/families_sdxl-base.json"
run python bench/bench_families.py --model "$SD35" --size "$FSIZE" --steps "$FSTEPS" --rounds 3 --threads "$THREADS" \
    --device "$DEVICE" --dtype "$DTYPE" --out "$OUT/families_sd3.5-medium.json"

step "memory per image at 1024 px, 28 steps (computed; the tiny cross-checks run on the CPU)"
run python bench/bench_memory.py --size 1024 --steps 28 --device "$DEVICE" --out "$OUT/memory_families.json"

step "SD 2-base tracing cost, record sizes, new words' maps"
run python bench/bench_tracing.py --architecture "$SD2" --size "$SIZE" --steps "$STEPS" --rounds 3 --threads "$THREADS" \
    --device "$DEVICE" --out "$OUT/tracing.json"

step "original DAAM and opendaam alternated in one run (SD 2-base)"
if [ -x "${DAAM_VENV:-/opt/daam-venv}/bin/python" ]; then
    run python bench/bench_vs_daam.py --size "$DSIZE" --steps "$DSTEPS" --rounds 3 --threads "$THREADS" \
        --device "$DEVICE" --out "$OUT/vs_daam.json"
else
    echo "skipped: no DAAM environment (bash bench/setup_daam_venv.sh)" >&2
fi

step "dataset generation overhead"
run python bench/bench_dataset.py --model "$DMODEL" --size "$SIZE" --steps "$STEPS" --items 4 --rounds 2 \
    --threads "$THREADS" --device "$DEVICE" --out "$OUT/dataset.json"

step "token optimization (on the CPU by design: records live there)"
run python bench/bench_optimize.py --size "$OSIZE" --epochs "$EPOCHS" --threads "$THREADS" --device cpu \
    --out "$OUT/optimize.json"

step "done in $((SECONDS - start)) s; results in $OUT"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
