#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (no hub access there): the real 4-bit bitsandbytes + Unsloth
# path of the demo recipe up to the merge, and the unsloth-vs-hf training benchmark on a random
# model of Llama-3.2-1B's shape. Python packages missing on that machine travel in .devsite/
# (made by bench/make_devsite.sh: pip install --target for its Python 3.12).
set -uo pipefail
export PYTHONPATH="$PWD/.devsite:$PWD" UNSLOTH_SKIP_TORCHVISION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export CPT_KIT_CACHE=/tmp/cpt-kit-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, unsloth, trl, peft, bitsandbytes, transformers; print('torch', torch.__version__, 'unsloth', unsloth.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -3
echo "== demo recipe, real 4-bit path, until merge"
timeout ${DEMO_TIMEOUT:-200} python3 -m cpt_kit.cli run recipes/demo.py --until merge --output-dir /tmp/demo-run 2>&1 | tail -40
cp /tmp/demo-run/manifest.json "$OUT/demo-manifest.json" 2>/dev/null
cp /tmp/demo-run/logs/train.jsonl "$OUT/demo-train.jsonl" 2>/dev/null
echo "== training benchmark"
python3 bench/make_random_model.py /tmp/m --shape llama-3.2-1b 2>&1 | tail -1
timeout ${BENCH_TIMEOUT:-300} python3 bench/train.py --model /tmp/m --seq-len 2048 --steps 12 --batch-size 2 --grad-accum 4 \
  --load-in-4bit --runs unsloth+gc,hf+gc --r 128 --out "$OUT/BENCHMARKS.md" 2>&1 | tail -30
