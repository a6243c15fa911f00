#!/usr/bin/env bash
# One prepared run on a lent GPU machine (../.library/device/README.md): install the carried
# wheels the image lacks, run the GPU-marked tests, then the throughput benchmark at Gemma 2
# 9B shapes, and print a short table last. Budget: under 8 minutes on an H100/H200.
#
#   prepare here:  pip download --no-deps -d .whl datasets dill multiprocess \
#                      pytorch-optimizer liger-kernel            (.whl/ is git-ignored)
#   run there:     bash scripts/gpu_check.sh     (carry: [".whl"]; results land in $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import liger_kernel; print('liger-kernel', liger_kernel.__version__ if hasattr(liger_kernel, '__version__') else 'installed')" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

# 1. correctness on the GPU: engine trials, fused loss vs eager (bf16), packing, QLoRA
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
  tests/test_gpu.py tests/test_loss.py tests/test_packing.py tests/test_model.py \
  2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}

# 2. throughput: plain transformers+peft vs the engine, same process, same data
timeout 300 python3 bench/throughput.py --out "$OUT/throughput.json" 2>&1 \
  | tee "$OUT/throughput.log"
bench=${PIPESTATUS[0]}

echo
echo "| check | result |"
echo "| --- | --- |"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)" "$OUT/gpu_tests.log" | sed -E 's/^(\w+) (.*)/| \2 | \1 |/'
echo
sed -n '/^| setup/,$p' "$OUT/throughput.log"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
