# Sourced by the GPU check scripts. When the machine's transformers is older than moba-rewrite's
# floor (moba_rewrite/integrations/hf_version.py) and wheels were carried in .whl/
# (benchmarks/fetch_gpu_wheels.sh), install what pip's resolver says is missing or too old, and
# nothing else, into a temporary folder put first on PYTHONPATH (the image's packages stay as
# they are; no index is reached). Sets HF_OK=1 when Hugging Face models can be rewritten, else 0
# with the reason printed.

_hf_supported() {
    python -c "from moba_rewrite.integrations.hf_version import require_supported; require_supported()"
}

HF_OK=1
if ! _hf_supported 2>/dev/null; then
    HF_OK=0
    if [ -s .whl/TRANSFORMERS_VERSION ]; then
        _site=$(mktemp -d)
        _want="transformers==$(cat .whl/TRANSFORMERS_VERSION)"
        echo "== installing $_want and what it needs from the carried .whl/ into $_site"
        if python -m pip install -q --dry-run --no-index --find-links .whl --report "$_site.json" "$_want" \
            && _wheels=$(python -c "
import json, sys, urllib.parse, urllib.request
for item in json.load(open(sys.argv[1]))['install']:
    print(urllib.request.url2pathname(urllib.parse.urlparse(item['download_info']['url']).path))" "$_site.json") \
            && python -m pip install -q --no-deps --no-index --target "$_site" $_wheels; then
            export PYTHONPATH="$_site:$PYTHONPATH"
            echo "== installed: $(echo $_wheels | xargs -n1 basename | tr '\n' ' ')"
        else
            echo "== could not install $_want from .whl/"
        fi
    fi
    if _hf_supported; then
        HF_OK=1
    else
        echo "== Hugging Face steps skipped: the transformers above is too old (carry .whl/ from" \
             "benchmarks/fetch_gpu_wheels.sh)"
    fi
fi
