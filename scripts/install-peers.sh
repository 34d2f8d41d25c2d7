#!/usr/bin/env bash
# The native peer of benchmarks/peers.py: llama.cpp, built from llama-cpp-python's source package for
# this CPU (a few minutes). On CPUs with AMX, ggml's AMX path needs a kernel permission that
# sandboxes and some VMs refuse (it faults), so it is left out and AVX-512 used instead.
# wllama comes from the npm registry when the script first runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if $PY -c "import llama_cpp" 2>/dev/null; then exit 0; fi
if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" $PY -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
