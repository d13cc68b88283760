#!/usr/bin/env bash
# The main job on an embedded default: sets up .venv, makes the local test model, starts two real
# vLLM CPU engines with the vllm-llmd plugin (KV events on), puts the router in front, sends real
# traffic and prints a report. Arguments go to examples/quickstart.py (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-env.sh
exec .venv/bin/python examples/quickstart.py "$@"
