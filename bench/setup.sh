#!/usr/bin/env bash
# Install what the side-by-side benchmarks need on top of the project's .venv:
#   - the peer router (vllm-router 0.1.17, Rust, from PyPI),
#   - the benchmark client's extra deps (pandas) and matplotlib for the plots,
#   - wrk and nginx (Debian packages) for the router-overhead benchmark.
# If vllm-router ever conflicts with the project's venv, it goes to bench/.venv-peers instead
# (bench/routers.py looks there too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/test.sh or create it first" >&2; exit 1; }

$PY -m pip install -q -e ".[bench]"
# vllm-router's deps (aiohttp, fastapi, uvicorn, orjson, requests, setproctitle) are already in the
# vLLM venv, so it installs there without changing anything else.
$PY -m pip install -q vllm-router==0.1.17 || true
if ! .venv/bin/vllm-router --help >/dev/null 2>&1; then
  echo "vllm-router not usable in .venv; installing into bench/.venv-peers" >&2
  python3 -m venv bench/.venv-peers
  bench/.venv-peers/bin/pip install -q vllm-router==0.1.17
fi

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q wrk nginx || { $SUDO apt-get update -q && $SUDO apt-get install -y -q wrk nginx; }
fi
# the Debian package may start a system nginx on port 80; the benchmark runs its own on free ports
echo "bench setup done: $(.venv/bin/vllm-router --help >/dev/null 2>&1 && echo vllm-router ok), $(wrk --version 2>&1 | head -1), $(nginx -v 2>&1)"
