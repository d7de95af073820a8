"""Benchmark: tokens/s of the full prepare stage vs a plain batched tokenizer(...) call.

    .venv/bin/python bench/prepare.py [--mb 8] [--num-proc 2] [--no-write]

Builds a corpus of about --mb MB from the shipped example texts and pydoc's topic texts,
recombined into distinct documents (random paragraphs, so deduplication keeps them), writes
it as .txt files, then in the same process measures
  raw:     tokenizer(texts) over the cleaned documents (batched, the fast tokenizer's own threads)
  prepare: cpt_kit.data.prepare.run (read + clean + exact/near dedup + tokenize + split + pack + save)
and prints a markdown row; appends it to BENCHMARKS.md under "## prepare" unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## prepare"
HEADER = ("| date | machine | corpus | raw tokenizer tok/s | prepare tok/s | ratio | command |\n"
          "|---|---|---|---|---|---|---|")


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    for folder in (REPO / "examples" / "data").glob("*"):
        texts += [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]
    return [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 40]


def build_corpus(folder: Path, megabytes: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    pool = paragraphs()
    folder.mkdir(parents=True, exist_ok=True)
    total, n = 0, 0
    while total < megabytes * 1e6:
        doc = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(6, 14)))
        (folder / f"doc{n:06d}.txt").write_text(doc, encoding="utf-8")
        total += len(doc.encode("utf-8"))
        n += 1
    return n


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    from rich.console import Console
    from transformers import AutoTokenizer

    from cpt_kit.data import prepare
    from cpt_kit.data.clean import clean_text
    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.recipe import Data, Model, Recipe
    from cpt_kit.rundir import RunDir
    from cpt_kit.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_model(tmp / "model", paragraphs()[:2000])
        n_docs = build_corpus(tmp / "corpus", args.mb)
        recipe = Recipe(name="bench", model=Model(base=str(base), max_seq_length=args.seq, load_in_4bit=False),
                        data=Data(sources=(str(tmp / "corpus"),), num_proc=args.num_proc))
        console = Console(stderr=True)

        best_prepare, best_raw, tokens = float("inf"), float("inf"), 0
        for attempt in range(2):
            run = RunDir(tmp / f"run{attempt}")
            ctx = StageContext(recipe, run, Manifest.load(run.manifest), console)
            start = time.perf_counter()
            metrics = prepare.run(ctx)
            best_prepare = min(best_prepare, time.perf_counter() - start)
            tokens = metrics["corpus_tokens"]

            tokenizer = AutoTokenizer.from_pretrained(str(base))
            texts = [clean_text(p.read_text(encoding="utf-8")) for p in sorted((tmp / "corpus").glob("*.txt"))]
            start = time.perf_counter()
            encoded = tokenizer(texts)["input_ids"]
            best_raw = min(best_raw, time.perf_counter() - start)
            raw_tokens = sum(map(len, encoded))

    raw_rate, prep_rate = raw_tokens / best_raw, tokens / best_prepare
    ratio = prep_rate / raw_rate
    command = f"python bench/prepare.py --mb {args.mb:g} --num-proc {args.num_proc} --seq {args.seq}"
    row = (f"| {datetime.date.today()} | {machine()} | {args.mb:g} MB, {n_docs:,} docs, {tokens:,} tokens | "
           f"{raw_rate:,.0f} | {prep_rate:,.0f} | {ratio:.2f}x | `{command}` |")
    print(HEADER)
    print(row)
    print(f"prepare {best_prepare:.2f} s, raw tokenizer {best_raw:.2f} s (best of 2); target ratio >= 0.5",
          file=sys.stderr)
    if not args.no_write:
        append_row(REPO / "BENCHMARKS.md", row)


def append_row(path: Path, row: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + (f"\n\n{SECTION}\n\nTokens/s of the full prepare stage (read, clean, exact and "
                                    "near dedup, tokenize, split, pack, save) vs a plain batched "
                                    "`tokenizer(texts)` call over the same documents, same process.\n\n"
                                    f"{HEADER}\n")
    lines = text.split("\n")
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start and not lines[end - 1].strip():
        end -= 1
    lines.insert(end, row)
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
