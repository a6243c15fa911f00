#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see ../.library/device/README.md there):
# install the carried wheels the image lacks, run the GPU-marked tests, print a short table.
#   run: bash scripts/gpu_check.sh      (with .whl/ carried: datasets, dill, multiprocess,
#                                        pytorch-optimizer; the image has torch/transformers/peft)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate, pyarrow, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'pyarrow', pyarrow.__version__, 'datasets', datasets.__version__)"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -rA 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
echo "| check | result |"
echo "| --- | --- |"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)" "$OUT/gpu_tests.log" | sed -E 's/^(\w+) (.*)/| \2 | \1 |/'
exit "$status"
