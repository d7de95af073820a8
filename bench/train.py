"""Training throughput: the unsloth backend vs the hf backend, same model, same config, same run.

Each backend trains in its own process (`import unsloth` patches transformers/peft/trl for the
whole process, so sharing one would not measure plain HF) through the real train stage, on
random-token blocks (throughput does not depend on the text). Reports tokens/s (median of the
per-step values after 2 warm-up steps), s/step and peak memory (CUDA max allocated, or CPU RSS),
and writes a "## train" section into BENCHMARKS.md.

    python bench/train.py                              # tiny offline model, CPU
    python bench/train.py --model unsloth/Llama-3.2-1B --seq-len 2048 --steps 30 --load-in-4bit
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> None:
    """Train once with one backend inside `args.work`; print a JSON result line."""
    if args.worker == "unsloth":
        import unsloth  # noqa: F401  (first)
    import io

    import torch
    from datasets import Dataset
    from rich.console import Console
    from transformers import AutoConfig, AutoTokenizer

    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.recipe import Lora, Model, Recipe, Train
    from cpt_kit.rundir import RunDir
    from cpt_kit.train import stage

    work = Path(args.work)
    run = RunDir(work / f"run-{args.worker}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.save_pretrained(run.tokenizer)
    if (Path(args.model) / "tokenizer.model").is_file():
        (run.tokenizer / "tokenizer.model").write_bytes((Path(args.model) / "tokenizer.model").read_bytes())
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    g = torch.Generator().manual_seed(0)
    n_blocks = args.steps * args.batch_size * args.grad_accum + 8
    blocks = torch.randint(3, min(vocab, len(tokenizer)), (n_blocks, args.seq_len), generator=g).tolist()
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(run.data / "train"))
    Dataset.from_dict({"input_ids": blocks[:4]}).save_to_disk(str(run.data / "heldout"))
    recipe = Recipe(
        name="bench", model=Model(base=args.model, max_seq_length=args.seq_len, load_in_4bit=args.load_in_4bit),
        lora=Lora(r=args.r, lora_alpha=args.r, use_rslora=False, train_embeddings=True),
        train=Train(backend=args.worker, learning_rate=5e-5, embedding_learning_rate=5e-6, max_steps=args.steps,
                    per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                    eval_steps=0, save_steps=args.steps * 10, warmup_ratio=0.0,
                    gradient_checkpointing=args.gradient_checkpointing))
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(file=io.StringIO()), "bench")
    metrics = stage.run(ctx)
    records = [json.loads(line) for line in (run.logs / "train.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = [r["tokens_per_second"] for r in steps[2:] if r.get("tokens_per_second")] or \
            [r["tokens_per_second"] for r in steps if r.get("tokens_per_second")]
    tps = statistics.median(timed)
    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum
    print("RESULT " + json.dumps({
        "backend": args.worker, "tokens_per_second": round(tps, 1), "seconds_per_step": round(tokens_per_step / tps, 4),
        "peak_memory_mb": max(r["memory_mb"] for r in steps), "loaded_in_4bit": metrics["loaded_in_4bit"],
        "precision": metrics["precision"], "first_loss": metrics["first_train_loss"],
        "last_loss": metrics["last_train_loss"], "device": ctx.hardware.name,
        "device_type": ctx.hardware.device}))


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--work", str(work), "--model", args.model,
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--grad-accum", str(args.grad_accum), "--r", str(args.r)]
    cmd += ["--load-in-4bit"] if args.load_in_4bit else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, UNSLOTH_SKIP_TORCHVISION_CHECK="1", PYTHONPATH=pythonpath)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{backend} backend failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def write_section(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    lines, out, skipping = old.splitlines(), [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() == "## train"
            if skipping:
                continue
        if not skipping:
            out.append(line)
    body = "\n".join(out).rstrip() + "\n\n" + text.rstrip() + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="hub id or local model dir (default: a tiny offline Llama)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit base (CUDA only; CPU loads 32-bit)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--backends", default="unsloth,hf")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="cpt-bench-train-") as tmp:
        work = Path(tmp)
        model_label = args.model
        if args.model is None:
            from cpt_kit.tiny_model import build_tiny_model
            texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "examples/data/general").glob("*.txt"))]
            args.model = str(build_tiny_model(work / "tiny", texts))
            model_label = "tiny Llama (hidden 256, 2 layers, vocab ~1000, built offline)"
        results = [run_backend(b.strip(), args, work) for b in args.backends.split(",") if b.strip()]
    for r in results:
        print(json.dumps(r))
    by = {r["backend"]: r for r in results}
    cmd = "python bench/train.py " + " ".join(sys.argv[1:])
    device = results[0]["device"]
    rows = ["| backend | tokens/s | s/step | peak memory MB | 4-bit | precision | loss first -> last |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['backend']} | {r['tokens_per_second']:.0f} | {r['seconds_per_step']:.3f} | "
                    f"{r['peak_memory_mb']:.0f} | {r['loaded_in_4bit']} | {r['precision']} | "
                    f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    ratio = ""
    if "unsloth" in by and "hf" in by:
        ratio = (f"\nunsloth / hf tokens/s ratio: **{by['unsloth']['tokens_per_second'] / by['hf']['tokens_per_second']:.2f}x**"
                 f"; peak memory ratio {by['unsloth']['peak_memory_mb'] / by['hf']['peak_memory_mb']:.2f}x\n")
    memory_kind = "CUDA max allocated" if results[0]["device_type"] == "cuda" else "process RSS"
    section = f"""## train

Training throughput, unsloth backend vs hf backend (transformers+PEFT+TRL), same model and
config, each in its own process, same run. LoRA r={args.r} on all linear layers + embed_tokens/lm_head
as full weights, separate embedding lr. tokens/s = median per-step value after 2 warm-up steps.

- command: `{cmd.strip()}`
- machine: {device} ({os.cpu_count()} CPU threads, load average {os.getloadavg()[0]:.1f} at the end: on a shared
  CPU machine the numbers carry that noise); memory column: {memory_kind}
- date: {datetime.date.today().isoformat()}
- model: {model_label}; seq {args.seq_len}, batch {args.batch_size} x accumulation {args.grad_accum}, {args.steps} steps, 
  load_in_4bit requested: {args.load_in_4bit}, gradient checkpointing: {args.gradient_checkpointing}

{chr(10).join(rows)}
{ratio}"""
    write_section(Path(args.out), section)
    print(section)


if __name__ == "__main__":
    main()
