#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (no registry there: it runs from the source
# tree with the machine's own torch, triton and transformers). Every step has its own time limit,
# so one slow step cannot cost the others their results. Usage, from the repository root:
#
#     OUT=out/gpu bash benchmarks/gpu_check.sh
#
# Writes to $OUT: the attention tests' log (the parity tests run on CUDA when it is there), the
# attention benchmark's rows.json and plot (bf16, 16 heads of 128, 1K..64K tokens), and the mpt-1b
# training step's log (seq 2048, bf16, sdpa, then flex attention with compiled blocks; mptkit only:
# transformers' eager MPT keeps every layer's (8, 16, 2048, 2048) scores for backward and does not
# fit in 141 GB at this batch).
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
$PYTHON -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

echo "== attention parity tests on CUDA"
timeout 170 $PYTHON -m pytest tests/test_attention.py -q -p no:cacheprovider -p no:logging --durations=5 2>&1 \
    | tee "$OUT/attention_tests.txt"

echo "== attention benchmark"
timeout 220 $PYTHON benchmarks/attention.py --device cuda --dtypes bfloat16 --heads 16 --head-dim 128 \
    --lengths 1024 2048 4096 8192 16384 32768 65536 --out "$OUT/attention" 2>&1 | tail -n 40

echo "== training step, mpt-1b"
{
    timeout 50 $PYTHON benchmarks/train_throughput.py --device cuda --preset mpt-1b --seq-len 2048 --batch 8 \
        --precisions bf16 --attn-impl sdpa --steps 5 --warmup 2 --skip-transformers
    timeout 110 $PYTHON benchmarks/train_throughput.py --device cuda --preset mpt-1b --seq-len 2048 --batch 8 \
        --precisions bf16 --attn-impl flex --compile --steps 5 --warmup 2 --skip-transformers
} 2>&1 | grep -v Warning | tee "$OUT/train_mpt1b.txt"
