#!/usr/bin/env bash
# Packages the lent GPU machine lacks (its image has torch, transformers, accelerate, peft...),
# installed for its Python 3.12 into .devsite/ and trimmed to fit the 64 MiB a device call may
# carry. Then: run bench/gpu.sh there with carry=[".devsite"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
rm -rf .devsite
"$PY312" -m pip install -q --target .devsite --no-deps --no-compile \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 bitsandbytes==0.50.2 datasets==4.8.5 peft==0.21.2 \
  dill==0.4.0 multiprocess==0.70.18 tyro docstring-parser typeguard shtab cut_cross_entropy msgspec \
  torchao==0.18.0 json5 nest-asyncio structlog pydantic pydantic-core annotated-types typing-inspection datasketch
# Trim: Unsloth Studio's web UI, CUDA builds other than 13.0, torchao's compiled ops (built for
# another torch), caches and stubs.
rm -rf .devsite/studio .devsite/bin
find .devsite/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' -delete
rm -f .devsite/torchao/*.so
find .devsite -name __pycache__ -prune -exec rm -rf {} +
find .devsite -name '*.pyi' -delete
du -sh .devsite
