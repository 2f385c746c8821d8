#!/usr/bin/env bash
# Download, on this machine, the wheels of the transformers installed here and of everything it
# needs, for the GPU image's Python (3.12, x86_64 Linux) and this one's, into .whl/ (ignored by
# git). The device image's transformers was 5.17.0 when last read (2026-11), older than
# moba-rewrite's floor (moba_rewrite/integrations/hf_version.py); the device reaches no package
# index, so benchmarks/gpu_packages.sh installs from these wheels there. Carry them with the
# device call: run(..., carry=[".whl"]). numpy is left out (the image has it; 16 MB).
#   usage: bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python3 -c "import transformers; print(transformers.__version__)")
here=$(python3 -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
mkdir -p .whl
for py in 3.12 "$here"; do
    python3 -m pip download -q --only-binary=:all: --python-version "$py" --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
        "transformers==$version"
done
rm -f .whl/numpy-*.whl
echo "$version" > .whl/TRANSFORMERS_VERSION
du -sh .whl
