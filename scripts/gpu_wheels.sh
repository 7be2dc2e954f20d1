#!/usr/bin/env bash
# Wheels the GPU benchmark machine lacks (it has no network): DeepSpeed (published only as a source
# archive: built here as a pure-Python wheel, its ops JIT-build on first use there) and the
# dependencies its image does not hold. Output: .whl/ (ignored by git), carried to the machine.
#   bash scripts/gpu_wheels.sh
# There:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
ex="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$ex")"; grep -qx "/.whl/" "$ex" 2>/dev/null || echo /.whl/ >> "$ex"
mkdir -p .whl
PY=${PYTHON:-python3}
DS_BUILD_OPS=0 $PY -m pip wheel --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
ls -la .whl
