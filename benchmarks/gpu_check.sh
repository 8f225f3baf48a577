#!/usr/bin/env bash
# The GPU checks in one command, as run on a lent GPU machine (docs/performance.md has the
# figures): the gpu-marked tests, the throughput benchmark's GPU configurations (model alone
# beside the whole command, decode=cpu and decode=gpu, compile=true) and dedup's exact search
# on the GPU at 1M x 256. Every log goes to $OUT (default ./gpu-out).
#
#     bash benchmarks/gpu_check.sh [images]
set -u
OUT=${OUT:-gpu-out}
IMAGES=${1:-6000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nproc
    python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

python3 -m pytest -m gpu -p no:randomly -p no:cacheprovider --continue-on-collection-errors \
    -q -rA tests > "$OUT/pytest_gpu.log" 2>&1
tail -25 "$OUT/pytest_gpu.log"

bench() {  # name, overrides...
    local name=$1
    shift
    timeout 200 python3 benchmarks/throughput_bench.py --images "$IMAGES" --sizes 500x375 \
        --layers global_pool --model-images 4096 --photos /tmp/photos \
        model.pretrained=false tracking=none device=cuda precision=bf16 batch_size=256 "$@" \
        > "$OUT/throughput_$name.log" 2>&1
    echo "== $name: $*"
    grep -A9 "^500x375 JPEGs" "$OUT/throughput_$name.log" || tail -15 "$OUT/throughput_$name.log"
}
mkdir -p /tmp/photos
bench resnet50_gpu model=resnet50 decode=gpu
bench resnet50_cpu model=resnet50 decode=cpu
bench efficientnet_b0_gpu model=efficientnet_b0 decode=gpu
bench efficientnet_b0_cpu model=efficientnet_b0 decode=cpu
bench resnet50_compile model=resnet50 decode=gpu compile=true

timeout 240 python3 benchmarks/dedup_bench.py --sizes 1000000 --methods exact-cuda \
    > "$OUT/dedup_exact_cuda.log" 2>&1
tail -8 "$OUT/dedup_exact_cuda.log"
