#!/usr/bin/env bash
# The GPU checks of one session on a CUDA machine, in the order they matter, each with its own
# time limit so that one slow or failing part leaves the others' results:
#   1. `slimtrain bench --device cuda` (issue 6's ratios against torch's fused AdamW on CUDA), and
#      against solow when ./.whl/solo holds its wheel and torchao 0.10.0's,
#   2. the tests that need CUDA (tests/optim/test_cuda.py: the hand-written Triton kernels against
#      eager CUDA bit for bit, compiled (Triton) and eager CUDA steps, CUDA and CPU
#      steps agree to rounding),
#   3. `slimtrain train --device cuda` tokens/s of adamw and slim on the medium GPT,
#   4. LoRDO and DDP runs under torchrun on NCCL (one rank: one GPU).
# At most about 11.5 minutes (the parts' time limits). Usage: bash benchmarks/gpu_checks.sh OUT_DIR
# (the python3 that holds a CUDA torch; peers installed from ./.whl when that folder holds wheels;
# the corpus from $SLIMTRAIN_CACHE, which a machine without internet needs carried in).
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
if compgen -G "$root/.whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/peers "$root"/.whl/*.whl && export PYTHONPATH=/tmp/peers
fi
export PYTHONPATH="$root/src:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# torch's and the peers' warnings are left out; slimtrain's RuntimeWarnings (a Triton kernel that
# failed to compile) are kept, and the bench's last line says how many steps the Triton kernels took
noise="UserWarning|FutureWarning|DeprecationWarning|warn_once"
echo "== 1. bench"
# 10 timed pairs: since the fifth session each timed step follows an untimed one of its own (about
# the time 20 steps took before)
timeout 210 python3 -m slimtrain bench --device cuda --sizes 16M 64M --steps 10 --warmup 3 \
    --json "$out/bench_cuda.json" 2>&1 | grep -v -E "$noise" | tee "$out/bench_cuda.txt"
echo "== 1b. solow (the SOLO authors' package: CUDA only, and it needs torchao 0.10's prototype module)"
if compgen -G "$root/.whl/solo/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/solo "$root"/.whl/solo/*.whl
    PYTHONPATH="/tmp/solo:$PYTHONPATH" timeout 90 python3 -m slimtrain bench --device cuda --sizes 16M \
        --steps 10 --warmup 3 --only "solow" "st.AdamW (4, 2)" --json "$out/bench_cuda_solow.json" 2>&1 \
        | grep -v -E "$noise" | tee "$out/bench_cuda_solow.txt"
fi
echo "== 2. tests"
timeout 120 python3 -m pytest -p no:cacheprovider -rfs --tb=short tests/optim/test_cuda.py \
    > "$out/test_cuda.txt" 2>&1
tail -15 "$out/test_cuda.txt"
echo "== 3. train"
# slim compiles its FP8 weight step and state formats on the first steps (Triton): allow for it
for run in "adamw 50" "slim 150"; do
    set -- $run
    timeout "$2" python3 -m slimtrain train --device cuda --recipe "$1" --model medium --steps 200 \
        --eval-every 200 --quiet --force --out "$out/train-$1" 2>&1 | tail -12
done
echo "== 4. lordo and ddp on NCCL"
for recipe in lordo ddp; do
    timeout 45 torchrun --nproc-per-node 1 -m slimtrain train --device cuda --recipe "$recipe" \
        --model small --steps 40 --eval-every 40 --quiet --force --out "$out/train-$recipe" 2>&1 | tail -12
done
for run in "$out"/train-*; do cp "$run/summary.json" "$out/summary-$(basename "$run").json" 2>/dev/null; done
rm -rf "$out"/train-*
