#!/usr/bin/env bash
# Installs everything tfscale needs on a fresh Debian machine with Python >= 3.10, idempotently:
#   - Debian's `dataset-fashion-mnist` package (the embedded default data set, 30 MB, MIT licence);
#   - a virtual environment in ./.venv with tfscale installed editable, with its test extras.
# A second call does nothing that is already done. Set TFSCALE_PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "tfscale: installing Debian's dataset-fashion-mnist" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY="${TFSCALE_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "tfscale: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.tfscale-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "tfscale: installing Python packages into .venv (a few minutes the first time)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
