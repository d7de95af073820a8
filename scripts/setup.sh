#!/usr/bin/env bash
# Installs everything cpt-kit needs into .venv (idempotent; a rerun on the same machine is quick).
# Follows ENVIRONMENT.md: CPU torch pinned, real unsloth on CPU, llama-cpp-python built with
# the flags that avoid the quantized-GGUF segfault, its sdist kept for the offline converter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
CACHE=.cache
LLAMA_VERSION=0.3.36
mkdir -p "$CACHE/wheels" "$CACHE/sdist"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
STAMP="$VENV/.cpt-kit-installed-$(cat constraints.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then echo "setup: .venv up to date"; exit 0; fi

echo "setup: torch (CPU build) + unsloth"
$PIP install -c constraints.txt torch==2.13.0
$PIP install -c constraints.txt "unsloth==2026.10.9" "unsloth_zoo==2026.10.9"
# GPU-only extras that break `import unsloth` on a CPU torch (ENVIRONMENT.md).
$VENV/bin/pip uninstall -y -q torchvision xformers triton 2>/dev/null || true

# The default native build segfaults on quantized GGUFs on some CPUs: build for a fixed AVX2 set.
# The ~5 min build is cached in the repo's ignored .cache/ and in ~/.cache/cpt-kit/wheels, so a
# fresh clone on the same machine reuses it.
MACHINE_CACHE="${CPT_KIT_CACHE:-$HOME/.cache/cpt-kit}/wheels"
echo "setup: llama-cpp-python $LLAMA_VERSION (wheel cached in $CACHE/wheels and $MACHINE_CACHE)"
mkdir -p "$MACHINE_CACHE"
WHEEL_GLOB="llama_cpp_python-$LLAMA_VERSION-*.whl"
if ! ls "$CACHE/wheels"/$WHEEL_GLOB >/dev/null 2>&1; then
  if ls "$MACHINE_CACHE"/$WHEEL_GLOB >/dev/null 2>&1; then
    cp "$MACHINE_CACHE"/$WHEEL_GLOB "$CACHE/wheels/"
  else
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      $VENV/bin/pip wheel -q --no-deps -w "$CACHE/wheels" "llama-cpp-python==$LLAMA_VERSION"
  fi
fi
cp -n "$CACHE/wheels"/$WHEEL_GLOB "$MACHINE_CACHE/" 2>/dev/null || true
$PIP install -c constraints.txt --no-deps "$CACHE/wheels"/llama_cpp_python-$LLAMA_VERSION-*.whl
$PIP install -c constraints.txt diskcache jinja2 typing-extensions numpy
# llama.cpp's own GGUF converter comes from the sdist of the same version (cpt_kit/export/llama_cpp.py
# finds it here; it would otherwise download it on first export).
if [ ! -d "$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION" ]; then
  $VENV/bin/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$CACHE/sdist"
  tar -xzf "$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$CACHE/sdist"
fi

echo "setup: cpt-kit and its test tools"
$PIP install -c constraints.txt -e ".[test]"
rm -f "$VENV"/.cpt-kit-installed-*
touch "$STAMP"
echo "setup: done"
