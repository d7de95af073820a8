"""Write a random-weight Llama of a real model's shape, for benchmarks on machines without hub access.

Throughput and memory depend on the shapes, not on the weights, so a random model with the
shape of Llama-3.2-1B measures what the real one would. The tokenizer is the tiny offline
SentencePiece one (benchmarks feed random token ids); the config's vocab_size is the real one.

    python bench/make_random_model.py OUT_DIR --shape llama-3.2-1b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, tied
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, True),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128256, True),
    "qwen2.5-0.5b-like": (896, 24, 14, 2, 4864, 151936, True),
    "smollm-135m": (576, 30, 9, 3, 1536, 49152, True),
    # small enough to train on a CPU, large enough that model states outweigh the runtime (planner test)
    "cpu-32k": (512, 4, 8, 8, 1408, 32000, False),
}


def build_random_model(out: Path, shape: str) -> Path:
    """Write a random bf16 Llama of `shape` (a SHAPES key) with the tiny offline tokenizer into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_kit.tiny_model import build_tiny_model

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "examples/data/general").glob("*.txt"))]
    build_tiny_model(out, texts)  # tokenizer files (and a tiny model we overwrite below)
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         tie_word_embeddings=tied, max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for old in Path(out).glob("model*.safetensors*"):
        old.unlink()
    model.save_pretrained(out)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {out}")
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    args = parser.parse_args()
    build_random_model(args.out, args.shape)


if __name__ == "__main__":
    main()
