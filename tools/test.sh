#!/usr/bin/env bash
# README quick start, command 2: install what tfscale needs, then run the test suite (the fast tests: everything
# not marked `slow`). Extra arguments go to pytest, e.g. `bash tools/test.sh -m slow` for the slow checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest "$@"
