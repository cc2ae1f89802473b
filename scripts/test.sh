#!/usr/bin/env bash
# Install the test needs (offline model included) and run the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
source "${VENV:-.venv}/bin/activate"
bash scripts/install_browser.sh   # Debian chromium for the real-browser widget test
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -ra "$@"
