"""Benchmark: tokens/s and peak RSS of the prepare stage vs a plain batched tokenizer call.

    python bench/prepare.py [--mb 100] [--num-proc 2] [--seq 2048] [--out /tmp/bench-prepare]

Builds (once, cached under --out) a byte-level BPE tokenizer of 32,768 tokens trained offline
with `tokenizers` on generated text of a made-up language (Zipf-distributed words, so the
vocabulary fills like a real one), and a corpus of about --mb MB of that text: half the bytes
are many short documents (20-150 words) in one JSONL file, half long documents (2k-20k words,
paragraphs) in one text file separated by `<doc>` lines. Then, each in a fresh subprocess so
each peak RSS is its own:
  raw:     tokenizer(batch) over the same documents, 1000 per call (the plain batched call a
           user would write; documents generated in memory, not timed)
  prepare: cpt_kit.data.prepare.run (read + split + clean + exact/near dedup + tokenize + split +
           pack + write)
and prints a markdown row: tokens/s of each, their ratio (target >= 0.5), prepare's peak RSS.
Set CPT_KIT_PROFILE=1 to write a cProfile of the prepare run next to the corpus.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 32_768
SYLLABLES = [c + v for c in "bcdfgklmnprstvzĉĝŝĵ" for v in "aeiou"] + ["aŭ", "oj", "aj", "ej"]


class Language:
    """A made-up language: 300k words from syllables, drawn with Zipf frequencies (numpy, fast)."""

    def __init__(self, seed: int = 0) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)
        lengths = self.rng.integers(1, 5, size=300_000)
        picks = self.rng.integers(0, len(SYLLABLES), size=int(lengths.sum()))
        words, at = [], 0
        for n in lengths.tolist():
            words.append("".join(SYLLABLES[i] for i in picks[at:at + n]))
            at += n
        self.words = np.array(words, dtype=object)
        weights = 1.0 / np.arange(1, len(words) + 1) ** 1.05
        self.cdf = np.cumsum(weights) / weights.sum()

    def text(self, n_words: int, paragraph_words: int = 0) -> str:
        import numpy as np

        idx = np.searchsorted(self.cdf, self.rng.random(n_words))
        words = self.words[idx].tolist()
        for i in range(11, n_words, 13):
            words[i] += "."
        if paragraph_words:
            for i in range(paragraph_words, n_words, paragraph_words):
                words[i] += "\n\n"
        return " ".join(words).replace("\n\n ", "\n\n")


def documents(megabytes: float, seed: int = 1):
    """Yield (kind, text): short and long documents, about half the bytes each, deterministic."""
    import numpy as np

    lang = Language(0)
    lang.rng = np.random.default_rng(seed)
    target = megabytes * 1e6
    short = long = 0
    while short + long < target:
        if short <= long:
            text = lang.text(int(lang.rng.integers(20, 150)))
            short += len(text.encode())
            yield "short", text
        else:
            text = lang.text(int(lang.rng.integers(2_000, 20_000)), paragraph_words=int(lang.rng.integers(60, 150)))
            long += len(text.encode())
            yield "long", text


def build_tokenizer(folder: Path) -> Path:
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text for _, text in documents(20, seed=99)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return folder


def write_corpus(folder: Path, megabytes: float) -> dict:
    marker = folder / "corpus.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"short": 0, "long": 0}
    with open(folder / "short.jsonl", "w", encoding="utf-8") as short, \
            open(folder / "long.txt", "w", encoding="utf-8") as long:
        for kind, text in documents(megabytes):
            counts[kind] += 1
            if kind == "short":
                short.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            else:
                long.write("<doc>\n" + text + "\n")
    marker.write_text(json.dumps(counts))
    return counts


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_raw(args) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    seconds = tokens = 0
    batch = []

    def flush():
        nonlocal seconds, tokens
        start = time.perf_counter()
        ids = tok(batch)["input_ids"]
        seconds += time.perf_counter() - start
        tokens += sum(map(len, ids)) + len(ids)  # + one EOS per document, as prepare counts
        batch.clear()

    for _, text in documents(args.mb):
        batch.append(text)
        if len(batch) == 1000:
            flush()
    if batch:
        flush()
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def worker_prepare(args) -> dict:
    from rich.console import Console
    from transformers import AutoTokenizer  # noqa: F401  (imported before the clock starts, as in the raw worker)

    from cpt_kit.data import prepare
    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.recipe import Data, Model, Recipe
    from cpt_kit.rundir import RunDir

    corpus = Path(args.corpus)
    recipe = Recipe(name="bench", model=Model(base=args.tokenizer, tokenizer=args.tokenizer,
                                              max_seq_length=args.seq, load_in_4bit=False),
                    data=Data(sources=(str(corpus / "short.jsonl"), str(corpus / "long.txt")), split_by="<doc>",
                              num_proc=args.num_proc))
    run = RunDir(Path(args.run))
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(stderr=True, quiet=True))
    profile = None
    if os.environ.get("CPT_KIT_PROFILE"):
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    start = time.perf_counter()
    metrics = prepare.run(ctx)
    seconds = time.perf_counter() - start
    if profile is not None:
        profile.disable()
        profile.dump_stats(str(corpus / "prepare.prof"))
    return {"seconds": seconds, "tokens": metrics["corpus_tokens"], "documents": metrics["documents_kept"],
            "peak_rss_mb": peak_rss_mb()}


def run_worker(kind: str, args, **extra) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--mb", str(args.mb), "--num-proc", str(args.num_proc),
               "--seq", str(args.seq)] + [f"--{k}={v}" for k, v in extra.items()]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default="/tmp/bench-prepare", help="cache of the tokenizer and corpora")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw tokenizer baseline (memory-only runs)")
    parser.add_argument("--worker", choices=("raw", "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((worker_raw if args.worker == "raw" else worker_prepare)(args)))
        return

    import shutil

    out = Path(args.out)
    tokenizer = build_tokenizer(out / "bpe32k")
    corpus = out / f"corpus-{args.mb:g}mb"
    counts = write_corpus(corpus, args.mb)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    prep = run_worker("prepare", args, tokenizer=tokenizer, corpus=corpus, run=run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    raw = {"seconds": float("nan"), "tokens": 0, "peak_rss_mb": float("nan")} if args.no_raw \
        else run_worker("raw", args, tokenizer=tokenizer)
    raw_rate, prep_rate = raw["tokens"] / raw["seconds"], prep["tokens"] / prep["seconds"]
    parallel = os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)")
    print("| date | machine | corpus | raw tokenizer tok/s | prepare tok/s | ratio | prepare peak RSS | "
          "raw peak RSS | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {datetime.date.today()} | {machine()} | {args.mb:g} MB: {counts['short']:,} short + {counts['long']:,} "
          f"long docs, {prep['tokens']:,} tokens, BPE {VOCAB_SIZE:,} | {raw_rate:,.0f} | {prep_rate:,.0f} | "
          f"{prep_rate / raw_rate:.2f}x | {prep['peak_rss_mb']:,.0f} MB | {raw['peak_rss_mb']:,.0f} MB | "
          f"`python bench/prepare.py --mb {args.mb:g} --num-proc {args.num_proc} --seq {args.seq}` "
          f"(TOKENIZERS_PARALLELISM={parallel}) |")
    print(f"prepare {prep['seconds']:.1f} s, raw tokenizer {raw['seconds']:.1f} s; target ratio >= 0.5", file=sys.stderr)


if __name__ == "__main__":
    main()
