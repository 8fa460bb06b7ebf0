#!/usr/bin/env bash
# Regenerate figures/ from the bundled checkpoints with one command (from anywhere):
#
#   bash figures/make_figures.sh                 # checkpoints/*.safetensors -> figures/digits/ (PNG, PDF, CSV)
#   bash figures/make_figures.sh --no-pdf        # extra arguments go to `collapse-probe figures`
#   PYTHON=/path/to/python bash figures/make_figures.sh
#
# The bundled checkpoints were trained on scikit-learn's digits, so they are probed with the 360 validation digits
# they were evaluated on (builtin:digits), not with photographs.
set -euo pipefail
cd "$(dirname "$0")/.."
# the project virtualenv (make demo / make test create it) if there is one, else the python on PATH
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python}; fi
exec "$PYTHON" -m collapse_probe figures --checkpoints checkpoints --output figures/digits --images builtin:digits "$@"
