"""Benchmark: what llama.cpp's quality levers buy per quantization on a small model with a large vocabulary.

    .venv/bin/python bench/quant_levers.py [--vocab 32000 --hidden 640 --layers 2 --steps 24 --blocks 12] [--out BENCHMARKS.md]

Builds offline a Llama-architecture model shaped like the small models that quantize worst (hidden 640,
so 640-wide rows are not a multiple of the K-quant block of 256 and fall back to other types; a
32k SentencePiece vocabulary trained on the text files of this machine's documentation), trains it
briefly on examples/data (English + Esperanto, a few documents of each held out), converts it to F16
and quantizes it with each lever off/on:
  none       llama.cpp's defaults for the type
  embd/out   token_embd.weight and output.weight kept at Q8_0 (export.token_embedding_type / output_tensor_type)
  imatrix    importance matrix from the training text (export.imatrix)
  both       the two together (cpt-kit's default)
For each: file size, tensors that needed a fallback type, perplexity change and mean KL divergence vs
the F16 GGUF on the held-out documents (cpt_kit.export.quant_quality, the numbers verify gates on).
Prints the table; --out FILE appends it to FILE (e.g. BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.markdown import add_to_section  # noqa: E402
LEVERS = {"none": {}, "embd/out Q8_0": {"token_embedding_type": "Q8_0", "output_tensor_type": "Q8_0"},
          "imatrix": {"imatrix": True}, "both": {"token_embedding_type": "Q8_0", "output_tensor_type": "Q8_0", "imatrix": True}}
QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def tokenizer_corpus(limit_bytes: int) -> list[str]:
    """Text for a 32k vocabulary: the machine's documentation files (vim, Python packages), then examples/data."""
    files = sorted(Path("/usr/share").rglob("*.txt")) + sorted(Path(sys.prefix).rglob("*.md"))
    texts, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts += [p for p in text.split("\n\n") if p.strip()]
        total += len(text)
        if total > limit_bytes:
            break
    return texts


def build(work: Path, args) -> tuple[Path, list[str], list[str]]:
    from cpt_kit.tiny_model import build_tiny_model, pretrain_tiny_model

    docs = [p.read_text(encoding="utf-8") for folder in ("general", "esperanto")
            for p in sorted((REPO / "examples" / "data" / folder).glob("*.txt"))]
    random.Random(0).shuffle(docs)
    heldout, train = docs[:10], docs[10:]
    model = work / "model"
    if not (model / "trained").is_file():
        started = time.perf_counter()
        build_tiny_model(model, tokenizer_corpus(args.corpus_mb * 2**20) + train, vocab_size=args.vocab,
                         hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                         intermediate_size=args.intermediate)
        print(f"tokenizer + model built in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        losses = pretrain_tiny_model(model, train, steps=args.steps, seq_len=128, batch_size=4,
                                     progress=lambda loss: print(f"  loss {loss:.3f}", flush=True))
        (model / "trained").write_text(f"{args.steps}\n")
        print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s: loss {losses[0]:.2f} -> {losses[-1]:.2f}",
              flush=True)
    return model, train, heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench-quant"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--blocks", type=int, default=12, help="held-out blocks of 256 tokens")
    parser.add_argument("--corpus-mb", type=int, default=8)
    parser.add_argument("--imatrix-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quants", default=",".join(QUANTS), help="comma-separated quantization types")
    parser.add_argument("--out", help="add the table to the '## export' section of this Markdown file")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from cpt_kit.export.gguf import convert_to_gguf, quantize_gguf
    from cpt_kit.export.imatrix import compute_imatrix, write_training_text
    from cpt_kit.export.quant_quality import compare_to_reference

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, train, heldout = build(work, args)
    tok = AutoTokenizer.from_pretrained(model)
    f16 = work / "F16.gguf"
    convert_to_gguf(model, f16, "f16")

    def blocks_of(texts, length):
        ids = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
        return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        tokens = write_training_text(tok, blocks_of(train, 512), text, args.imatrix_tokens)
        im = compute_imatrix(f16, text, work / "imatrix.gguf", tokens, chunk=512, threads=args.threads)
    print(f"imatrix: {im['chunks']} chunks of 512 tokens in {im['seconds']:.0f} s", flush=True)

    files, infos = {}, {}
    for quant in args.quants.split(","):
        for lever, options in LEVERS.items():
            if quant == "Q8_0" and options.get("imatrix"):
                continue  # Q8_0 does not use an importance matrix
            name = f"{quant} / {lever}"
            path = work / f"{quant}-{lever.split()[0].replace('/', '-')}.gguf"
            infos[name] = quantize_gguf(f16, path, quant, nthread=args.threads,
                                        token_embedding_type=options.get("token_embedding_type"),
                                        output_tensor_type=options.get("output_tensor_type"),
                                        imatrix=work / "imatrix.gguf" if options.get("imatrix") else None)
            files[name] = path
    heldout_blocks = blocks_of(heldout, 256)[:args.blocks]
    started = time.perf_counter()
    quality = compare_to_reference(f16, files, heldout_blocks, args.threads)
    print(f"compared {len(files)} GGUFs on {len(heldout_blocks)} blocks in {time.perf_counter() - started:.0f} s")

    f16_mib = f16.stat().st_size / 2**20
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "cpu")
    lines = [
        "## quantization levers (bench/quant_levers.py)", "",
        f"Model built offline: Llama architecture, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{len(tok)}-token SentencePiece vocabulary, untied embeddings, trained {args.steps} steps (batch 4 x 128) on",
        "examples/data (English + Esperanto); 10 documents held out. Importance matrix from "
        f"{im['chunks']} x 512 training tokens.",
        f"Perplexity change and mean KL divergence (nats/token) vs the F16 GGUF (perplexity "
        f"{quality['reference']['perplexity']:.2f}, {quality['reference']['tokens']} held-out tokens, F16 {f16_mib:.1f} MiB).", "",
        f"- command: `python bench/quant_levers.py --vocab {args.vocab} --hidden {args.hidden} --layers {args.layers} --steps {args.steps} "
        f"--blocks {args.blocks} --imatrix-tokens {args.imatrix_tokens} --quants {args.quants}`",
        f"- machine: {cpu}, {os.cpu_count()} CPU threads (shared), {args.threads} threads used",
        f"- date: {datetime.date.today().isoformat()}", "",
        "| quant | levers | size MiB | fallback tensors | token_embd / output | perplexity vs F16 | mean KL | KL p99 | same top token |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, info in infos.items():
        q = quality["quantized"][name]
        quant, lever = name.split(" / ")
        lines.append(f"| {quant} | {lever} | {info['bytes'] / 2**20:.1f} | {info['fallback_tensors']} of {info['fallback_of']} | "
                     f"{info['token_embd_type']} / {info['output_type']} | {q['ppl_delta']:+.2%} | {q['mean_kl']:.4f} | "
                     f"{q['kl_p99']:.3f} | {q['same_top_token']:.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        add_to_section(Path(args.out), "export", text)


if __name__ == "__main__":
    main()
