#!/usr/bin/env bash
# The main job: train the MLP on scikit-learn's bundled digits (no download needed).
# Extra arguments go to `dbmpi train`, e.g. --set train.epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m dbmpi train configs/mlp_digits.toml "$@"
