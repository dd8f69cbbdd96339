#!/usr/bin/env bash
# Everything this repository checks on a CUDA GPU, in one command, most-wanted first (about 20 minutes on an H100,
# most of it torch.compile):
#
#   1. the tests that only a GPU runs in full: the Triton loss kernel in bf16 with every gradient (skipped on CPU,
#      where the interpreter gives wrong bf16 results), compute_loss and per-row adapters on CUDA tensors;
#   2. the training step at batch 8 x 512, compiled (the one GPU figure not yet measured), then eager in the
#      sequence layout;
#   3. the eager steps of both GPU configs again, and a profile of the 8 x 512 step of each library.
#
# Results land in benchmarks/results/ (each file records its command and machine); commit them with the GPU named.
# Usage, from the repository root after the README's install:  bash benchmarks/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks.sh: no CUDA GPU here')"

pytest -q tests/test_fused_linear_cross_entropy.py tests/test_compute_loss.py tests/test_multi_adapter.py

python benchmarks/train_step.py --configs gpu-8x512 --repeats 20 --warmup 3 --compile reduce-overhead
python benchmarks/train_step.py --configs gpu-8x512 --repeats 20 --warmup 3 --virtual-token-layout sequence \
    --methods 'prompt tuning (8)' 'p-tuning MLP (20, h=128)'
python benchmarks/train_step.py --configs gpu-16x64 gpu-8x512 --repeats 20 --warmup 3
python benchmarks/profile_step.py --config gpu-8x512 --method 'prompt tuning (8)'
