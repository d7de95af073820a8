#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (no hub access there), in one call:
#   1. the planner's memory estimate vs measured peaks at three sizes (bench/plan_check.py)
#   2. SFT throughput unsloth vs hf and the padding share with/without packing (bench/sft.py)
#   3. the T4 path: the demo on the hf backend in fp16 (TRL's QLoRA bf16 cast, fixed in cpt-kit)
#   4. verify/evaluate scoring memory on a 262k vocabulary on the GPU (bench/perplexity_memory.py)
# Python packages missing on that machine travel in .devsite/ (made by bench/make_devsite.sh:
# pip install --target for its Python 3.12); run with carry=[".devsite"].
set -uo pipefail
export PYTHONPATH="$PWD/.devsite:$PWD" UNSLOTH_SKIP_TORCHVISION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export CPT_KIT_CACHE=/tmp/cpt-kit-cache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, unsloth, trl, peft, bitsandbytes, transformers; print('torch', torch.__version__, 'unsloth', unsloth.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
echo "== 1. planner vs measured"
timeout ${PLAN_TIMEOUT:-230} python3 bench/plan_check.py --steps 4 --out "$OUT/plan.md" 2>&1 | grep -v Warning | tail -12
echo "== 2. SFT unsloth vs hf"
python3 bench/make_random_model.py /tmp/sftm --shape qwen2.5-0.5b-like 2>&1 | tail -1
timeout ${SFT_TIMEOUT:-170} python3 bench/sft.py --model /tmp/sftm --seq-len 1024 --batch-size 4 --steps 8 --load-in-4bit \
  --gradient-checkpointing --configs hf,unsloth,unsloth+packing --out "$OUT/sft.md" 2>&1 | tail -12
echo "== 3. demo on the hf backend in fp16 (the T4 path)"
timeout ${FP16_TIMEOUT:-120} python3 -m cpt_kit.cli run recipes/demo.py --until evaluate --output-dir /tmp/fp16 \
  --set train.backend=hf --set train.precision=fp16 --set model.dtype=float16 --set train.max_steps=60 2>&1 | tail -15
cp /tmp/fp16/manifest.json "$OUT/fp16-manifest.json" 2>/dev/null
echo "== 4. scoring memory, 262k vocabulary, GPU"
timeout ${PPL_TIMEOUT:-60} python3 bench/perplexity_memory.py --device cuda --blocks 4 --old-batch 4 --phases hf_old,hf_new 2>&1 | tail -8
