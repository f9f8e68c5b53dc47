#!/usr/bin/env bash
# GPU checks for a lent machine that has torch and CUDA but not all of vlmtune's libraries.
#
#   bash benchmarks/gpu_check.sh fetch   # here, with the package registry: wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh run     # there, in the repository root, with .whl carried along
#
# `run` installs the wheels into /tmp/site, then runs benchmarks/gpu_memory.py on the
# GLM-4.1V-9B shape with random weights (every mode, text and image batches) and writes
# gpu_memory.json, gpu_memory.md and the log to $OUT (or outputs/benchmarks).
# NOTE: written for the H200 machines' image (Python 3.12, torch with CUDA 13, no
# bitsandbytes, pydantic or datasets), and not yet run on one.
set -euo pipefail

WHEELS=(
    bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    transformers==5.25.0 peft==0.21.2 accelerate==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    huggingface_hub==2.4.0
)

case "${1:-}" in
fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl
    ;;
run)
    out="${OUT:-outputs/benchmarks}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
    python3 benchmarks/gpu_memory.py --output "$out" 2>&1 | tee "$out/gpu_memory.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh fetch|run" >&2
    exit 2
    ;;
esac
