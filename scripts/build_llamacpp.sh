#!/usr/bin/env bash
# Builds llama.cpp's llama-bench for bench/llamacpp_decode.py, from the only source these machines can reach: the
# llama.cpp tree vendored in llama-cpp-python's source package on PyPI (pinned). CPU only, -march=native, OpenMP;
# ~5 minutes on 2 cores. Prints the tree's path (pass it as --llama-cpp).
# Usage: bash scripts/build_llamacpp.sh [DIR]        (default ~/.cache/moebench/llama.cpp)
set -euo pipefail
version=0.3.36
case "${1:-}" in
    -h|--help) sed -n '2,5s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "build_llamacpp: unknown option $1 (usage: bash scripts/build_llamacpp.sh [DIR])" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "build_llamacpp: one DIR at most (usage: bash scripts/build_llamacpp.sh [DIR])" >&2; exit 2; }
dir="${1:-$HOME/.cache/moebench/llama.cpp}"
tree="$dir/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -d "$tree" ]; then
    mkdir -p -- "$dir"
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$dir"
    tar xzf "$dir/llama_cpp_python-$version.tar.gz" -C "$dir"
fi
log="$dir/build.log"  # the compiler's output (its warnings too); its end is shown if the build fails
{ cmake -S "$tree" -B "$tree/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF &&
  cmake --build "$tree/build" --target llama-bench -j "$(nproc)"; } >"$log" 2>&1 || {
    tail -n 20 -- "$log" >&2; echo "build_llamacpp: the build failed (the whole log: $log)" >&2; exit 1; }
echo "$tree"
