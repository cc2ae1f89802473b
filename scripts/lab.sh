#!/usr/bin/env bash
# Install the workbench and open JupyterLab on the guided notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source "${VENV:-.venv}/bin/activate"
exec jupyter lab notebooks/ "$@"
