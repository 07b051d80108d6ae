#!/usr/bin/env bash
# Builds llama.cpp (only llama-bench, llama-batched-bench and llama-simple) as the
# benchmark peer of benchmarks/generate.py and the reference runtime of the GGUF
# tests (tests/test_gguf_model.py, marked slow).
#
# Why the llama-cpp-python sdist: it vendors a pinned llama.cpp and is fetched with
# the ordinary pip client, so the build needs no git access and no other network.
#
# usage: scripts/build_llama_cpp.sh [OUT_DIR] [SDIST.tar.gz]
#   OUT_DIR  default build/llama.cpp (git-ignored); binaries land in OUT_DIR/bin
#   SDIST    default: the newest llama_cpp_python-*.tar.gz in $LLAMA_SDIST_DIR
#            (default /tmp/llsdist), downloaded with pip if there is none
# env: JOBS (default 2), NICE (default 15)
set -euo pipefail

OUT=${1:-build/llama.cpp}
SDIST_DIR=${LLAMA_SDIST_DIR:-/tmp/llsdist}
SDIST=${2:-}
JOBS=${JOBS:-2}
NICE=${NICE:-15}

if [[ -z "$SDIST" ]]; then
    SDIST=$(ls -1 "$SDIST_DIR"/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)
    if [[ -z "$SDIST" ]]; then
        mkdir -p "$SDIST_DIR"
        pip download --no-deps --no-binary :all: llama-cpp-python -d "$SDIST_DIR"
        SDIST=$(ls -1 "$SDIST_DIR"/llama_cpp_python-*.tar.gz | sort -V | tail -1)
    fi
fi
[[ -f "$SDIST" ]] || { echo "build_llama_cpp: no sdist at $SDIST" >&2; exit 1; }

# llama.cpp #26954: the AMX q8_0 repacked prefill crashes when built with GCC 12.
# Only AMX CPUs (Intel Sapphire Rapids and later) take that path; there the
# benchmark passes `--repack 0` to llama-bench (benchmarks/generate.py checks the
# same condition through the marker file written below).
GCC_MAJOR=$(${CC:-gcc} -dumpversion 2>/dev/null | cut -d. -f1 || echo 0)
AMX=0
grep -qw amx_tile /proc/cpuinfo 2>/dev/null && AMX=1
mkdir -p "$OUT"
if [[ "$AMX" == 1 && "$GCC_MAJOR" == 12 ]]; then
    echo "build_llama_cpp: WARNING: AMX CPU and GCC 12: llama.cpp's AMX q8_0 prefill" \
         "crashes with this compiler (llama.cpp #26954); run llama-bench with --repack 0" >&2
    echo "amx-gcc12" > "$OUT/REPACK_OFF"
else
    rm -f "$OUT/REPACK_OFF"
fi

SRC="$OUT/src"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    rm -rf "$SRC" "$OUT/.unpack"
    mkdir -p "$OUT/.unpack"
    tar xzf "$SDIST" -C "$OUT/.unpack"
    mv "$OUT"/.unpack/llama_cpp_python-*/vendor/llama.cpp "$SRC"
    rm -rf "$OUT/.unpack"
fi
basename "$SDIST" > "$OUT/SOURCE"

nice -n "$NICE" cmake -S "$SRC" -B "$OUT" -G "Unix Makefiles" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DBUILD_SHARED_LIBS=OFF
nice -n "$NICE" cmake --build "$OUT" -j "$JOBS" \
    --target llama-bench llama-batched-bench llama-simple
ls -l "$OUT/bin/"
