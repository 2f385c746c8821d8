#!/usr/bin/env bash
# Run the README's test command against another torch and/or transformers, in a fresh venv and a
# clean clone of HEAD (nothing here changes this machine's own environment). How the version table
# of benchmarks/RESULTS.md ("Which torch and transformers the suite runs on") was measured.
#   usage: [PYTHON=/path/to/python3.12] bash benchmarks/compat_check.sh TORCH_VERSION [TRANSFORMERS_VERSION] [PYTEST ARGS...]
#   e.g.   PYTHON=/root/.pyenv/versions/3.12.1/bin/python3.12 bash benchmarks/compat_check.sh 2.11.0
#              (the GPU image's Python and torch: a CUDA build, ~5 GB)
#          bash benchmarks/compat_check.sh 2.13.0 5.25.0 tests/test_hf_cache.py
# torch other than 2.13.0 comes from PyPI as a CUDA build (it runs on the CPU); pip's config
# (/etc/xdg/pip caps torch here) is ignored, so any release can be asked for.
set -euo pipefail
torch_version=${1:?usage: compat_check.sh TORCH_VERSION [TRANSFORMERS_VERSION] [PYTEST ARGS...]}
transformers_version=${2:-}
shift $(( $# < 2 ? $# : 2 ))
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "/tmp/moba-compat-torch${torch_version}-XXXX")
echo "== venv and clone in $work"
"${PYTHON:-python3}" -m venv "$work/venv"
git clone -q "$root" "$work/src"
pip=("$work/venv/bin/python" -m pip install -q)
PIP_CONFIG_FILE=/dev/null "${pip[@]}" "torch==$torch_version"
PIP_CONFIG_FILE=/dev/null "${pip[@]}" "torch==$torch_version" -e "$work/src[test]" \
    ${transformers_version:+"transformers==$transformers_version"}
"$work/venv/bin/python" -c "import sys, torch, transformers; print('== python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__)"
cd "$work/src"
MPLBACKEND=Agg "$work/venv/bin/python" -m pytest -q -n 2 -p no:cacheprovider "${@:-tests}"
