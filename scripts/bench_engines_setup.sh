#!/usr/bin/env bash
# The benchmark extra of benchmarks/bench_cpu_engines.py: llama-cpp-python 0.3.36 built from its sdist for this CPU
# (CMAKE_ARGS="-DGGML_NATIVE=ON"; ~15 minutes on 2 cores) in its own virtualenv, and the sdist's llama.cpp converter
# (vendor/llama.cpp/convert_hf_to_gguf.py, conversion/, gguf-py/) extracted beside it. Never a test or CI dependency.
#
#   bash scripts/bench_engines_setup.sh [DIR]     # default DIR: ~/.cache/gpt-oss-workbench/llama-bench
#
# Then: python benchmarks/bench_cpu_engines.py --llama-python DIR/venv/bin/python \
#           --llama-src DIR/llama_cpp_python-0.3.36/vendor/llama.cpp
set -euo pipefail
VERSION=0.3.36
DIR="${1:-$HOME/.cache/gpt-oss-workbench/llama-bench}"
mkdir -p "$DIR/sdist"
[ -x "$DIR/venv/bin/python" ] || python3 -m venv "$DIR/venv"
"$DIR/venv/bin/pip" install -q --upgrade pip
SDIST="$DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
[ -f "$SDIST" ] || "$DIR/venv/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
tar -xzf "$SDIST" -C "$DIR" "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
if ! "$DIR/venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python $VERSION for this CPU (~15 minutes on 2 cores) ..."
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$DIR/venv/bin/pip" install "$SDIST"
fi
echo "llama-python: $DIR/venv/bin/python"
echo "llama-src:    $DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
