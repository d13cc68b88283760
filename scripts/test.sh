#!/usr/bin/env bash
# The whole test suite: sets up .venv (vLLM CPU, NIXL, test tools), lints, then runs every test,
# unit tests and tests on real vLLM CPU engines. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-env.sh
.venv/bin/python -m ruff check vllm_llmd connectors tests examples bench
exec .venv/bin/python -m pytest "$@"
