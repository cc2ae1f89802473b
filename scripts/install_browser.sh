#!/usr/bin/env bash
# Install what tests/test_browser.py needs: Debian's chromium and the Python `playwright` package.
# Idempotent: apt only runs when /usr/bin/chromium is missing; pip only when playwright is not importable.
# We never run `playwright install` (it downloads its own browser from a CDN); the test drives the system
# chromium through `executable_path`. Run inside the venv you test with (scripts/test.sh activates it).
set -euo pipefail

if [[ ! -x /usr/bin/chromium ]]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [[ "$(id -u)" -ne 0 ]] && SUDO="sudo"
    # not fatal: without chromium the browser test skips and says why
    { $SUDO apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } ||
      echo "install_browser.sh: could not install chromium (the browser test will skip)" >&2
  else
    echo "install_browser.sh: no apt-get here; install Chromium yourself (the browser test skips without it)" >&2
  fi
fi

PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet playwright
fi
