#!/usr/bin/env bash
# README quick start, command 1: install what tfscale needs, then run the main job (scripts/train.py with its
# defaults: ResNet-8 on Fashion-MNIST TFRecords, 4 replicas, 2D-torus all-reduce). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python scripts/train.py "$@"
