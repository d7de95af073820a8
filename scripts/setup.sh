#!/usr/bin/env bash
# Installs everything cpt-kit needs into .venv (idempotent; a rerun on the same machine is quick).
# Follows ENVIRONMENT.md: CPU torch pinned, real unsloth on CPU, llama-cpp-python built with
# the flags that avoid the quantized-GGUF segfault, its sdist kept for the offline converter.
# Each step prints the seconds since the start, so a slow install shows where the time went.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CPT_KIT_VENV:-.venv}
CACHE=.cache
LLAMA_VERSION=0.3.36
START=$(date +%s)
step() { echo "setup: [$(( $(date +%s) - START )) s] $*"; }
mkdir -p "$CACHE/wheels" "$CACHE/sdist"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
STAMP="$VENV/.cpt-kit-installed-$(cat constraints.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then echo "setup: $VENV up to date"; exit 0; fi

# llama-cpp-python: its sdist (llama.cpp's own GGUF converter and llama-imatrix's source come from it;
# cpt_kit/export/llama_cpp.py finds it here) and a wheel built from that same file. The default native
# build segfaults on quantized GGUFs on some CPUs: build for a fixed AVX2 set. Only what cpt-kit uses
# is built: libllama + ggml (+ llama-common, which the package always builds); LLAVA_BUILD=OFF skips
# libmtmd (multimodal, about a third of the compile time). All of it runs in the background while
# torch and unsloth install; the wheel is cached in .cache/wheels and ~/.cache/cpt-kit/wheels, so a
# fresh clone on the same machine reuses it.
SDIST="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION"
MACHINE_CACHE="${CPT_KIT_CACHE:-$HOME/.cache/cpt-kit}/wheels"
WHEEL_GLOB="llama_cpp_python-$LLAMA_VERSION-*.whl"
mkdir -p "$MACHINE_CACHE"
if ! ls "$CACHE/wheels"/$WHEEL_GLOB >/dev/null 2>&1 && ls "$MACHINE_CACHE"/$WHEEL_GLOB >/dev/null 2>&1; then
  cp "$MACHINE_CACHE"/$WHEEL_GLOB "$CACHE/wheels/"
fi
llama_cpp_python() {
  if [ ! -d "$SDIST" ]; then
    $VENV/bin/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$CACHE/sdist"
    tar -xzf "$SDIST.tar.gz" -C "$CACHE/sdist"
    step "llama-cpp-python source downloaded"
  fi
  if ! ls "$CACHE/wheels"/$WHEEL_GLOB >/dev/null 2>&1; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF" \
      $VENV/bin/pip wheel -q --no-deps -w "$CACHE/wheels" "$SDIST.tar.gz"
    step "llama-cpp-python wheel built"
  fi
}
step "llama-cpp-python $LLAMA_VERSION source + wheel, in the background (log: $CACHE/llama-cpp-python.log)"
llama_cpp_python >"$CACHE/llama-cpp-python.log" 2>&1 &
BUILD_PID=$!

step "torch (CPU build)"
$PIP install -c constraints.txt torch==2.13.0
step "unsloth"
$PIP install -c constraints.txt "unsloth==2026.10.9" "unsloth_zoo==2026.10.9"
# GPU-only extras that break `import unsloth` on a CPU torch (ENVIRONMENT.md).
$VENV/bin/pip uninstall -y -q torchvision xformers triton 2>/dev/null || true
step "cpt-kit"
$PIP install -c constraints.txt -e .

step "waiting for llama-cpp-python"
if ! wait "$BUILD_PID"; then
  tail -30 "$CACHE/llama-cpp-python.log" >&2
  echo "setup: downloading or building llama-cpp-python failed (full log: $CACHE/llama-cpp-python.log)" >&2
  exit 1
fi
grep "^setup:" "$CACHE/llama-cpp-python.log" || true
cp -n "$CACHE/wheels"/$WHEEL_GLOB "$MACHINE_CACHE/" 2>/dev/null || true
step "llama-cpp-python and the test tools"
$PIP install -c constraints.txt --no-deps "$CACHE/wheels"/$WHEEL_GLOB
$PIP install -c constraints.txt diskcache jinja2 typing-extensions numpy -e ".[test]"
rm -f "$VENV"/.cpt-kit-installed-*
touch "$STAMP"
step "done"
