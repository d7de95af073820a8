"""Cost of the run-directory checks for a 1B-class model's finished run.

Generates the file set a finished run of a Llama-3.2-1B-shaped recipe leaves (sizes of the real
files: 2.47 GB merged safetensors, 360 MB LoRA r=128 adapter, 256 MB packed training data,
17 MB tokenizer.json three times, three GGUFs, and the small files of evaluate, compare, verify,
safety and report) and times, with the paths of `STAGE_TABLE`:

- record: the output records written when each stage finishes (`file_records.records`);
- check:  the check a rerun makes that every recorded output is intact (`file_records.problems`);
- inputs: the input records each stage's fingerprint hashes (`file_records.records` on `inputs`);

against a baseline measured in the same run: a full sha256 of merged/model.safetensors.

The merged model, adapter and data are real random bytes (3.2 GB); the three GGUFs (4.6 GB) are
sparse files with random 1 MiB blocks where the sampled hash reads, to spare the shared disk.

    python bench/rundir_checks.py [--dir /tmp/rundir-bench] [--repeat 3] [--keep] [--cold]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpt_kit.file_records import BLOCK, FULL_HASH_LIMIT, problems, records  # noqa: E402
from cpt_kit.pipeline import STAGE_TABLE  # noqa: E402

MB = 10**6
REAL = {  # path: bytes (written in full)
    "data/train/data-00000-of-00001.arrow": 256 * MB, "data/train/dataset_info.json": 2_000,
    "data/train/state.json": 300, "data/heldout/data-00000-of-00001.arrow": 8 * MB,
    "data/heldout/dataset_info.json": 2_000, "data/heldout/state.json": 300, "data/heldout_texts.jsonl": 2 * MB,
    "data/tokenizer/tokenizer.json": 17 * MB, "data/tokenizer/tokenizer_config.json": 54_000,
    "data/tokenizer/special_tokens_map.json": 300, "data/stats.json": 3_000,
    "adapter/adapter_model.safetensors": 360 * MB, "adapter/adapter_config.json": 1_000,
    "adapter/tokenizer.json": 17 * MB, "adapter/tokenizer_config.json": 54_000,
    "adapter/special_tokens_map.json": 300, "adapter/cpt_kit_train.json": 600,
    "eval/perplexity.json": 1_500, "eval/samples.json": 4_000,
    "merged/model.safetensors": 2_471_000_000, "merged/config.json": 900, "merged/generation_config.json": 200,
    "merged/tokenizer.json": 17 * MB, "merged/tokenizer_config.json": 54_000, "merged/special_tokens_map.json": 300,
    "eval/comparison.json": 6_000, "eval/comparison.md": 4_000, "gguf/quality.json": 1_200,
    "ollama/Modelfile": 2_000, "verify.json": 6_000, "safety.json": 8_000, "logs/train.jsonl": 400_000,
    "report.md": 9_000, "report.html": 320_000, "report/loss.png": 60_000, "report/perplexity.png": 40_000,
}
SPARSE = {"gguf/model-F16.gguf": 2_479_000_000, "gguf/model-Q8_0.gguf": 1_322_000_000,
          "gguf/model-Q4_K_M.gguf": 808_000_000}


def generate(root: Path) -> None:
    chunk = os.urandom(16 * 2**20)
    for rel, size in REAL.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:  # a random first MiB (files differ), then a repeated random chunk
            handle.write(os.urandom(min(size, 2**20)))
            left = size - min(size, 2**20)
            while left:
                handle.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    for rel, size in SPARSE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(size)
            for offset in (0, size // 2 - BLOCK // 2, size - BLOCK):
                handle.seek(offset)
                handle.write(os.urandom(BLOCK))


def evict(root: Path) -> None:
    """Drop the file set (only it) from the page cache: the next reads come from disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def timed(fn, repeat: int, cold_root: Path | None = None) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        if cold_root is not None:
            evict(cold_root)
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def full_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/rundir-bench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--cold", action="store_true", help="evict the file set from the page cache before each timing")
    args = parser.parse_args()
    root = Path(args.dir)
    if not (root / "verify.json").is_file():
        print(f"generating the file set in {root} ...", flush=True)
        generate(root)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    outputs = [o for stage in STAGE_TABLE for o in stage.outputs]
    inputs = [i for stage in STAGE_TABLE for i in stage.inputs]
    cold = root if args.cold else None
    t_record, recorded = timed(lambda: records(root, outputs), args.repeat, cold)
    t_check, found = timed(lambda: problems(root, recorded), args.repeat, cold)
    assert found == [], found
    t_inputs, _ = timed(lambda: [records(root, stage.inputs) for stage in STAGE_TABLE], args.repeat, cold)
    t_full, _ = timed(lambda: full_sha256(root / "merged/model.safetensors"), args.repeat, cold)
    sampled = sum(1 for r in recorded.values() if "sampled_sha256" in r)
    print(f"page cache: {'evicted before each timing (cold)' if args.cold else 'warm'}")
    print(f"file set: {len(recorded)} output files, {total / 1e9:.2f} GB ({sampled} over "
          f"{FULL_HASH_LIMIT // 2**20} MiB, sampled); inputs declared {len(inputs)} paths")
    print(f"record outputs (after each stage):   {t_record:.3f} s")
    print(f"check outputs (each rerun / plan):   {t_check:.3f} s")
    print(f"input records (fingerprints, all {len(STAGE_TABLE)} stages): {t_inputs:.3f} s")
    print(f"baseline: full sha256 of merged/model.safetensors (2.47 GB): {t_full:.3f} s")
    print(f"ratio check / baseline: {t_check / t_full:.3f}; check + inputs = {t_check + t_inputs:.3f} s (target < 5 s)")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
