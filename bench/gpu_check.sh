#!/usr/bin/env bash
# The whole GPU check, on one machine with an NVIDIA GPU, in under 8 minutes:
#   1. the GPU test set (tests/test_gpu.py, with the test session's Ray given the GPU),
#   2. bench/gpu.py (transformers in-process vs raytrainer on 1 GPU worker, and the generator's sampling speed).
# Packages, one of three ways:
#   - .gpu_wheels/ present (bench/gpu_wheels.sh, carried to the lent GPU machine, which reaches no registry): they
#     are installed offline (pip --no-index --no-deps --target) into $GPU_SITE, outside the repository, over the
#     machine's own python3 and its CUDA torch (PYTHONPATH=$GPU_SITE:<repository>, PATH=$GPU_SITE/bin:...);
#   - PYTHON=/path/to/python: an environment that already has everything;
#   - otherwise `make venv` builds .venv (the Makefile installs the CUDA torch build where nvidia-smi finds a GPU).
# Output, under $OUT when set (the device tool's output folder), else bench/results: gpu_versions.txt (what ran),
# gpu_tests.txt, gpu_bench.md.
# `--smoke` checks the script on a machine without a GPU: the test set (its GPU tests skip), bench/gpu.py --smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
SMOKE=
[ "${1:-}" = "--smoke" ] && SMOKE=1
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"

if [ -z "$SMOKE" ] && ! nvidia-smi -L; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed): nothing to check (--smoke checks the script)." >&2
    exit 2
fi
if [ -d .gpu_wheels ] && [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python3)
    GPU_SITE=${GPU_SITE:-/tmp/raytrainer-gpu-site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GPU_SITE" \
        .gpu_wheels/*.whl
    # The `raytrainer` command (a job's entrypoint in the job-submit test), as `pip install -e .` would make it.
    printf '#!/bin/sh\nexec "%s" -m raytrainer "$@"\n' "$PYTHON" > "$GPU_SITE/bin/raytrainer"
    chmod +x "$GPU_SITE/bin/raytrainer"
    export PYTHONPATH="$GPU_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$GPU_SITE/bin:$PATH"
    echo "gpu_check: carried wheels installed in $GPU_SITE ($(( $(date +%s) - started )) s)"
elif [ -z "${PYTHON:-}" ]; then
    make venv
    PYTHON=.venv/bin/python
fi

# What runs: Python, torch/CUDA, the GPU, each package's version and folder, and any unmet requirement of ours.
"$PYTHON" - > "$RESULTS/gpu_versions.txt" <<'EOF'
import importlib.metadata as metadata, platform, sys, tomllib
from packaging.requirements import Requirement

import torch


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("ray", "transformers", "accelerate", "datasets", "huggingface_hub", "tokenizers", "safetensors", "numpy",
             "pyarrow", "pandas", "fsspec", "aiohttp", "pydantic", "peft", "pytest", "pytest-timeout", "deepspeed"):
    try:
        dist = metadata.distribution(name)
        print(f"{name} {dist.version}  ({dist.locate_file('')})")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
# Not carried (bench/gpu_wheels.sh says why), and mlflow-skinny, which only tests/test_training_arguments.py uses.
LEFT_OUT = {"py-spy", "virtualenv", "google-api-core", "mlflow-skinny"}
# Ours (pyproject.toml, with the test extra), and one level down, those of each package we name.
project = tomllib.loads(open("pyproject.toml").read())["project"]
ours = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
unmet = []
for owner, extras, requirements in [("raytrainer", {""}, ours)] + [
        (r.name, r.extras or {""}, [Requirement(line) for line in metadata.requires(r.name) or []])
        for r in ours if installed(r.name)]:
    for need in requirements:
        if need.marker and not any(need.marker.evaluate({"extra": extra}) for extra in extras):
            continue
        version = installed(need.name)
        if version is None or not need.specifier.contains(version, prereleases=True):
            unmet.append(f"{owner} needs {need.name}{need.specifier}: {version or 'missing'}"
                         + (" (left out on purpose)" if need.name in LEFT_OUT else ""))
print("unmet requirements: " + ("none" if not unmet else "\n  " + "\n  ".join(sorted(set(unmet)))))
EOF
cat "$RESULTS/gpu_versions.txt"
"$PYTHON" -c "import raytrainer, torch, sys; sys.exit(0 if torch.cuda.is_available() or '$SMOKE' else \
'gpu_check: torch ' + torch.__version__ + ' has no CUDA: install a CUDA build of torch (or set PYTHON)')"

status=0
gpus=$("$PYTHON" -c "import torch; print(min(torch.cuda.device_count(), 1))")
# Tests: ~4 minutes on one H100-class GPU (the job-submit test starts a Ray head of its own). SIGINT at the limit
# and at most 150 s a test, so that pytest still writes its summary and the failures' details.
RAYTRAINER_TEST_GPUS=$gpus timeout -s INT -k 20 270 "$PYTHON" -m pytest tests/test_gpu.py ${GPU_CHECK_TESTS:-} -v \
    -rs -p no:cacheprovider --durations=0 --timeout=150 --basetemp="$(mktemp -d /tmp/gpu-tests-XXXX)" 2>&1 \
    | tee "$RESULTS/gpu_tests.txt" || status=$?
# Benchmark: ~2 minutes (three child processes; repeats reuse the warm worker).
timeout 150 "$PYTHON" bench/gpu.py --repeats "${GPU_CHECK_REPEATS:-3}" ${SMOKE:+--smoke} 2>&1 \
    | tee "$RESULTS/gpu_bench.md" || status=$((status ? status : $?))
echo "gpu_check: $(( $(date +%s) - started )) s, exit status $status"
exit $status
