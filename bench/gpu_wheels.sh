#!/usr/bin/env bash
# Wheels for the lent GPU machine (CPython 3.12, x86_64, no package registry): exactly what its image lacks for
# `import raytrainer`, tests/test_gpu.py and bench/gpu.py. Its image has CUDA torch 2.11, accelerate 1.15,
# transformers 5.17, pyarrow, pandas, peft, tensorboard, aiohttp, grpcio, pytest, pytest-timeout, ... (the device
# tool's KINDS.md) but no Ray and no datasets, and older transformers than ours (>=5.20).
#
# Downloads the pinned wheels below into .gpu_wheels/ (git-ignored), slims Ray's wheel (no Java jar, no RLlib,
# Serve or LLM, no source maps of the dashboard's web client, binaries stripped of symbols) and checks that the wheels and the repository's
# files fit the 64 MiB that travel with one device run. bench/gpu_check.sh installs them there, offline.
# Usage: bench/gpu_wheels.sh            (PYTHON=... picks the pip; any Python works, the wheels are for 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=.gpu_wheels
LIMIT_MIB=64

# What the GPU machine lacks, pinned (Ray 2.60 with its default/train/tune needs, our transformers, datasets).
# Left out on purpose, as a raytrainer run never loads them: py-spy (the dashboard's profiler button), virtualenv
# (runtime_env pip/conda), google-api-core and google-auth (opencensus's exporters to Google; Ray's GCP autoscaler).
PINS=(
    ray==2.60.0 transformers==5.20.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    tensorboardX==2.6.5 aiohttp-cors==0.8.1 colorful==0.5.8 smart-open==9.0.4
    opencensus==0.11.4 opencensus-context==0.1.3 googleapis-common-protos==1.76.0
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
    opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-prometheus==0.66b2
)

# Built in a scratch folder, put in place at the end: a failed download leaves the last set as it was.
build=$(mktemp -d /tmp/gpu-wheels-XXXX)
trap 'rm -rf "$build"' EXIT
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$build" "${PINS[@]}"

# Slim Ray: drop what a raytrainer run never loads, strip the binaries' symbols, rewrite RECORD to match.
"$PYTHON" - "$build"/ray-*.whl <<'EOF'
import base64, hashlib, os, shutil, subprocess, sys, tempfile, zipfile

path = sys.argv[1]
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")  # the dashboard needs its client build: not its .map
STRIP = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")
strip = shutil.which("strip")
before = os.path.getsize(path)
slim = path + ".slim"
with zipfile.ZipFile(path) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
    record_name = next(n for n in source.namelist() if n.endswith(".dist-info/RECORD"))
    record = []
    for info in source.infolist():
        name = info.filename
        if name.startswith(DROP) or name.endswith(".js.map") or name == record_name:
            continue
        data = source.read(info)
        if name in STRIP and strip:
            with tempfile.NamedTemporaryFile() as binary:
                binary.write(data)
                binary.flush()
                subprocess.run([strip, "--strip-unneeded", binary.name], check=True)
                data = open(binary.name, "rb").read()
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size = len(data)
        target.writestr(info, data, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{record_name},,")
    target.writestr(record_name, "\n".join(record) + "\n")
os.replace(slim, path)
print(f"ray wheel slimmed: {before / 2**20:.1f} -> {os.path.getsize(path) / 2**20:.1f} MiB"
      + ("" if strip else " (no `strip` here: binaries kept whole)"))
EOF

rm -rf "$WHEELS"
mv "$build" "$WHEELS"

# The budget: wheels + what else travels (tracked and untracked-not-ignored files) <= 64 MiB.
ls -l "$WHEELS" | awk 'NR > 1 {printf "%8.2f MiB  %s\n", $5 / 1048576, $9}' | sort -rn
wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
repository=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {t += $1} END {print t}')
total=$((wheels + repository))
awk -v w="$wheels" -v r="$repository" -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {
    printf "wheels %.2f MiB + repository %.2f MiB = %.2f MiB of %d MiB\n", w / 2^20, r / 2^20, t / 2^20, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheels: over the ${LIMIT_MIB} MiB that travel with one run" >&2
    exit 1
fi
