#!/usr/bin/env bash
# The GPU-machine checks of issue 12 in one run (benchmarks/README: "On a GPU"): the batched-target goldens on
# cuda, bench_device.py (targets on the device, the paper stage's loader and loop against the bare step) and
# bench_pretrain_step.py on cuda (ViT-B paper setup and the ViT-S setup). Results go to $OUT (default
# benchmarks/results/gpu). Wheels for packages the GPU image lacks may lie in .whl/ (decord, a timm release).
set -u -o pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, timm, cv2, numba, decord; print(torch.__version__, timm.__version__, cv2.__version__, numba.__version__, decord.__version__)"
  nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
MME_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_target_batch.py > "$OUT/pytest.txt" 2>&1
tail -5 "$OUT/pytest.txt"
timeout 240 python3 benchmarks/bench_device.py --device cuda --workers 10 15 --epochs 3 --out "$OUT/device.json" \
    2>&1 | grep -v -i warn | tee "$OUT/device.log"
step() {  # bench_pretrain_step.py on cuda: $1 timeout, $2 setup, $3 variants, $4 result name
    timeout "$1" python3 benchmarks/bench_pretrain_step.py --device cuda --setup "$2" --peak-sizes 8192 --rounds 3 \
        --steps 5 --variants "$3" --out "$OUT/$4.json" 2>&1 | tail -5
}
step 80 paper videomae-bf16,ours-bf16 step_paper
step 50 vit-s videomae-bf16,ours-bf16 step_vits
step 120 paper ours-bf16,ours-bf16-compile step_paper_compile
