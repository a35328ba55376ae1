#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp's Python binding) into .venv for benchmarks/bench_llamacpp.py.
# Never a test dependency: the tests read GGUF files back with the `gguf` package only.
#
# PyPI ships llama-cpp-python as an sdist only, so pip compiles llama.cpp (CPU backend) with CMake and
# a C++ compiler: about 9 minutes or more on 2 busy cores. The wheel is built once into a wheel
# directory (default /work/wheels, LMFORGE_WHEELS=DIR to change) and later installs reuse it.
#
#   bash scripts/setup_llamacpp.sh                 # install (build the wheel if none is there)
#   LLAMA_CPP_VERSION=0.3.36 bash scripts/setup_llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/pip"
[ -x "$PIP" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 1; }
WHEELS=${LMFORGE_WHEELS:-/work/wheels}
SPEC="llama-cpp-python${LLAMA_CPP_VERSION:+==$LLAMA_CPP_VERSION}"

if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python $(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)') already installed"
  exit 0
fi
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-${LLAMA_CPP_VERSION:-*}-*.whl >/dev/null 2>&1; then
  echo "building $SPEC into $WHEELS (CMake + C++ compiler; ~9 min or more)"
  command -v cmake >/dev/null || echo "warning: cmake not on PATH; pip will fetch the cmake wheel" >&2
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$PIP" wheel --no-deps "$SPEC" -w "$WHEELS"
fi
# its runtime dependencies (numpy, typing-extensions, diskcache, jinja2) come from the index; the binding itself from the wheel
"$PIP" install --find-links "$WHEELS" --only-binary llama-cpp-python "$SPEC"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
