#!/usr/bin/env bash
# llama-cpp-python (Python bindings that compile stock llama.cpp from source) for tests/test_gguf.py, which proves
# that the GGUF files convert_model.py writes load and run in unmodified llama.cpp. Without it those tests skip.
# Compiling takes ~10+ minutes on 2 cores, so the built wheel is cached outside the checkout and reused on the
# next run. Safe to run twice.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${MINIMIND_CI_CACHE:-$HOME/.cache/minimind-ci}/wheels"
mkdir -p "$CACHE"

if python3 -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed"
  exit 0
fi

wheel="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [[ -z "$wheel" ]]; then
  echo "building llama-cpp-python $VERSION from source (about 10+ minutes on 2 cores; cached in $CACHE)"
  start=$(date +%s)
  tmp="$(mktemp -d)"
  # Two parallel compile jobs: CI has two cores. GGML_NATIVE=OFF keeps the cached wheel portable across CPUs
  # of the same architecture (a -march=native wheel could crash with "illegal instruction" elsewhere).
  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" \
    python3 -m pip wheel -q --no-deps --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$VERSION"
  built="$(ls "$tmp"/llama_cpp_python-*.whl)"
  # Move into the cache only once complete, so an interrupted build never leaves a half wheel to reuse.
  mv "$built" "$CACHE/"
  rmdir "$tmp" 2>/dev/null || true
  wheel="$CACHE/$(basename "$built")"
  echo "built in $(( $(date +%s) - start )) s: $wheel"
fi

python3 -m pip install -q "$wheel"
python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
