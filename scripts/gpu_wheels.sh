#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels that the lent GPU machine's image lacks, built for
# its Python (3.12, x86-64, manylinux); scripts/gpu_check.sh installs them there with no
# network. The image already has torch 2.11, transformers 5.17, peft, accelerate, numpy,
# scipy, pandas, pyarrow, pyyaml, rich, typer and pytest (../.library/device/KINDS.md).
#
#   bash scripts/gpu_wheels.sh          # here, after `make install`; then carry [".whl"]
#
# The project's own dependencies come at the versions this checkout's .venv tested on the
# CPU; the GPU extra at the versions pinned below. About 52 MB: within the 64 MiB a call
# may carry, with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "scripts/gpu_wheels.sh: .venv is missing; run make install first" >&2; exit 1; }

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
wanted=()
for name in optuna sqlalchemy greenlet alembic mako colorlog datasets dill multiprocess \
            pytorch-optimizer; do
  wanted+=("$name==$(version "$name")")
done
# The `gpu` extra (pyproject.toml): Liger Kernel's Triton kernels, bitsandbytes for 4-bit.
wanted+=("liger-kernel==0.8.5" "bitsandbytes==0.50.2")

rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wanted[@]}"
ls .whl
du -sh .whl
