"""SFT throughput (unsloth vs hf backend, same config) and the share of padding without/with packing.

Each configuration runs the real sft prepare and train stages in its own process (`import
unsloth` patches transformers/peft/trl for the whole process) on the same synthetic chat data:
conversations of 1-3 exchanges whose turns vary in length like real chat data (drawn from the
shipped English text), so padding matters. tokens/s counts real tokens (padding excluded):
median of the per-step values after 2 warm-up steps. The padding share is the share of the
model's input positions that are padding when rows are batched in the trainer's (seeded random)
order; packing (TRL BFD + padding-free collation) has none. Runs on CUDA when there is one.

    python bench/sft.py                                  # tiny offline model, CPU; --out FILE to keep it
    python bench/sft.py --model /tmp/m --seq-len 2048 --batch-size 4 --steps 12 --load-in-4bit   # GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.markdown import add_to_section  # noqa: E402
from bench.worker import run_worker  # noqa: E402
CONFIGS = {"hf": ("hf", False), "unsloth": ("unsloth", False), "hf+packing": ("hf", True),
           "unsloth+packing": ("unsloth", True)}


def make_chat_data(path: Path, n: int, seed: int = 0) -> None:
    """n conversations with 1-3 exchanges; turns of 5-60 (user) and 10-150 (assistant) words."""
    words = " ".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "examples/data/general").glob("*.txt"))).split()
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        start = rng.randrange(len(words) - hi)
        return " ".join(words[start:start + rng.randint(lo, hi)])

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            messages = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                messages += [{"role": "user", "content": text(5, 60)}, {"role": "assistant", "content": text(10, 150)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def worker(args: argparse.Namespace) -> None:
    backend, packing = CONFIGS[args.worker]
    if backend == "unsloth":
        import unsloth  # noqa: F401  (first)
    import io

    from datasets import load_from_disk
    from rich.console import Console

    from cpt_kit.errors import CptKitError
    from cpt_kit.pipeline import run_pipeline
    from cpt_kit.recipe import Data, Eval, Lora, Model, Recipe, Train
    from cpt_kit.rundir import RunDir
    from cpt_kit.train.chat_data import pack, padding_share

    run = RunDir(Path(args.work) / f"run-{args.worker.replace('+', '-')}")
    recipe = Recipe(
        name="bench-sft", model=Model(base=args.model, max_seq_length=args.seq_len, load_in_4bit=args.load_in_4bit),
        lora=Lora(r=args.r, lora_alpha=args.r, use_rslora=False, train_embeddings=True),
        data=Data(sources=(args.data,), heldout_fraction=0.02),
        train=Train(objective="sft", backend=backend, packing=packing, learning_rate=1e-4,
                    embedding_learning_rate=1e-5, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    gradient_accumulation_steps=args.grad_accum, eval_steps=0, save_steps=args.steps * 10,
                    warmup_ratio=0.0, gradient_checkpointing=args.gradient_checkpointing),
        eval=Eval(max_new_tokens=0))
    try:
        manifest = run_pipeline(recipe, run, Console(file=io.StringIO()), until="train")
    except CptKitError as exc:
        print("RESULT " + json.dumps({"config": args.worker, "error": exc.message}))
        return
    records = [json.loads(line) for line in (run.logs / "train.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = [r["tokens_per_second"] for r in steps[2:] if r.get("tokens_per_second")] or \
            [r["tokens_per_second"] for r in steps if r.get("tokens_per_second")]
    train = load_from_disk(str(run.data / "train"))
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    rows = pack(train, args.seq_len) if packing else train.select(order)
    metrics = manifest.metrics("train")
    print("RESULT " + json.dumps({
        "config": args.worker, "backend": backend, "packing": packing,
        "tokens_per_second": round(statistics.median(timed), 1), "rows": len(rows),
        "padding_share": padding_share(rows, args.batch_size, packing, args.seq_len),
        "peak_memory_mb": max(r["memory_mb"] for r in steps), "precision": metrics["precision"],
        "loaded_in_4bit": metrics["loaded_in_4bit"], "first_loss": metrics["first_train_loss"],
        "last_loss": metrics["last_train_loss"],
        "trained_share": manifest.metrics("prepare")["trained_token_share"]}))


def run_config(config: str, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--work", str(work), "--model", args.model, "--data",
           args.data, "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--grad-accum", str(args.grad_accum), "--r", str(args.r)]
    cmd += ["--load-in-4bit"] if args.load_in_4bit else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    result = run_worker(cmd)
    return result if result is not None else {"config": config, "error": "worker failed"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local model dir or hub id (default: a tiny offline Llama)")
    p.add_argument("--conversations", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit base (CUDA only; CPU loads 32-bit)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--configs", default="hf,unsloth,hf+packing,unsloth+packing")
    p.add_argument("--out", help="add the table to the '## sft' section of this Markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="cpt-bench-sft-") as tmp:
        work = Path(tmp)
        label = args.model
        if args.model is None:
            from cpt_kit.tiny_model import build_tiny_model
            texts = [f.read_text(encoding="utf-8") for f in sorted((REPO / "examples/data/general").glob("*.txt"))]
            args.model = str(build_tiny_model(work / "tiny", texts))
            label = "tiny Llama (hidden 256, 2 layers, vocab ~1000, no chat template: ChatML added), built offline"
        args.data = str(work / "chat.jsonl")
        make_chat_data(Path(args.data), args.conversations)
        results = [run_config(c.strip(), args, work) for c in args.configs.split(",") if c.strip()]
    for r in results:
        print(json.dumps(r))
    write_report(Path(args.out) if args.out else None, args, label, results)


def write_report(path: Path | None, args: argparse.Namespace, label: str, results: list[dict]) -> None:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} threads"
    rows = ["| config | tokens/s (real) | rows | padding share | peak memory MB | loss first -> last |",
            "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | failed: {r['error']} | | | | |")
            continue
        rows.append(f"| {r['config']} | {r['tokens_per_second']:.0f} | {r['rows']} | {r['padding_share']:.1%} | "
                    f"{r['peak_memory_mb']:.0f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    by = {r["config"]: r for r in results if "error" not in r}
    ratios = [f"{a} / {b} tokens/s: **{by[a]['tokens_per_second'] / by[b]['tokens_per_second']:.2f}x**"
              for a, b in (("unsloth", "hf"), ("hf+packing", "hf"), ("unsloth+packing", "unsloth")) if a in by and b in by]
    memory = "CUDA max allocated" if torch.cuda.is_available() else "process RSS"
    text = f"""### bench/sft.py, {datetime.date.today().isoformat()}, {device}

SFT throughput, unsloth vs hf backend, without and with packing: same model, data and config,
each configuration in its own process, in one run (the baseline is the hf row of the same run).

- command: `python bench/sft.py {' '.join(sys.argv[1:])}`
- machine: {device}; load average {os.getloadavg()[0]:.1f} at the end (shared machine: noisy); memory: {memory}
- date: {datetime.date.today().isoformat()}
- model: {label}; max_seq_length {args.seq_len}, batch {args.batch_size} x accumulation {args.grad_accum},
  {args.steps} steps, LoRA r={args.r} + embed_tokens/lm_head, 4-bit requested: {args.load_in_4bit}
- data: {args.conversations} synthetic conversations (1-3 exchanges, 5-60 / 10-150 words per turn)

{chr(10).join(rows)}

{'; '.join(ratios)}
"""
    print(text)
    if path is not None:
        add_to_section(path, "sft", text)


if __name__ == "__main__":
    main()
