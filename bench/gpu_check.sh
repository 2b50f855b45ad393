#!/usr/bin/env bash
# The whole GPU check, on one machine with an NVIDIA GPU, in under 8 minutes:
#   1. the GPU test set (tests/test_gpu.py, with the test session's Ray given the GPU),
#   2. bench/gpu.py (transformers in-process vs raytrainer on 1 GPU worker, and the generator's sampling speed).
# Output: bench/results/gpu_tests.txt and bench/results/gpu_bench.md (and on stdout).
# PYTHON=/path/to/python uses an existing environment with a CUDA torch; otherwise `make venv` builds .venv
# (the Makefile installs the CUDA torch build where nvidia-smi finds a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! nvidia-smi -L; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed): nothing to check." >&2
    exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    make venv
    PYTHON=.venv/bin/python
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
'gpu_check: torch ' + torch.__version__ + ' has no CUDA: install a CUDA build of torch (or set PYTHON)')"

mkdir -p bench/results
started=$(date +%s)
status=0
# Tests: ~4 minutes on one H100-class GPU (the job-submit test starts a Ray head of its own).
RAYTRAINER_TEST_GPUS=1 timeout 330 "$PYTHON" -m pytest tests/test_gpu.py -m gpu -v -rs -p no:cacheprovider \
    --basetemp="$(mktemp -d /tmp/gpu-tests-XXXX)" 2>&1 | tee bench/results/gpu_tests.txt || status=$?
# Benchmark: ~2 minutes (three child processes; repeats reuse the warm worker).
timeout 150 "$PYTHON" bench/gpu.py --repeats 3 2>&1 | tee bench/results/gpu_bench.md || status=$((status ? status : $?))
echo "gpu_check: $(( $(date +%s) - started )) s, exit status $status"
exit $status
