"""Benchmark: merge peak memory vs shard size, export time vs a file copy, llama.cpp vs HF tokens/s.

    .venv/bin/python bench/export.py [--hidden 1024 --layers 6 --shard 50MB] [--no-write]

Builds (offline) a Llama-architecture model big enough that the shards dominate (random weights,
bf16, several --shard sized safetensors shards; the tiny SentencePiece tokenizer) and a PEFT
LoRA adapter (r16 on all linear layers + embed_tokens/lm_head), then in the same run, same disk:
  memory: peak RSS of `merge_adapter` in a fresh subprocess (VmHWM after reset, minus the RSS of
          the imported libraries), relative to the largest base shard; target <= 2x shard + adapter
  time:   merge + convert (F16) + quantize (Q8_0, Q4_K_M) vs copying the base model's files
  stage:  cpt-kit's gguf stage (same quantizations, levers off) vs the same converter + quantizer run by
          hand (convert_hf_to_gguf.py, then llama_model_quantize per type, each a plain subprocess);
          --vocab pads the model's vocabulary (the converter adds [PAD] tokens) to time real vocab sizes
  speed:  greedy decode tokens/s, llama.cpp (llama-cpp-python; F16, Q8_0, Q4_K_M GGUF) vs
          transformers `generate` (fp32) on the same merged model, same prompt, same thread count
Prints a summary and replaces the "## export" section of BENCHMARKS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.worker import run_worker  # noqa: E402
SECTION = "## export"

MERGE_CHILD = """
import json, sys, time
import torch, safetensors, peft  # the libraries are loaded before the baseline is taken
from cpt_kit.export.merge import merge_adapter
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
baseline = status("VmRSS:")
start = time.perf_counter()
info = merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3])
info.update(seconds=time.perf_counter() - start, baseline=baseline, peak=status("VmHWM:"))
print("RESULT " + json.dumps(info))
"""


def build(work: Path, hidden: int, layers: int, shard: str, vocab: int = 0) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cpt_kit.tiny_model import build_tiny_model

    base, adapter = work / "base", work / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        return base, adapter
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "examples/data/general").glob("*.txt"))]
    build_tiny_model(base, texts, dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(base)
    for f in base.glob("*.safetensors"):
        f.unlink()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 256 * 256,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(base, max_shard_size=shard)
    model = model.float()
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, use_rslora=True, modules_to_save=["embed_tokens", "lm_head"],
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    shutil.copyfile(base / "tokenizer.model", adapter / "tokenizer.model")
    return base, adapter


HAND_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: robust to other jobs' load."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of function(*args)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def by_hand(merged: Path, out: Path, quants: tuple[str, ...], threads: int) -> None:
    """llama.cpp's converter + llama-cpp-python's quantizer run the plain way, no checks."""
    from cpt_kit.export.llama_cpp import converter_script

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run([sys.executable, str(converter_script()), str(merged), "--outfile", str(out / "m-F16.gguf"),
                    "--outtype", "f16"], check=True, capture_output=True)
    for quant in quants:
        subprocess.run([sys.executable, "-c", HAND_QUANTIZE, str(out / "m-F16.gguf"), str(out / f"m-{quant}.gguf"),
                        quant, str(threads)], check=True, capture_output=True)


def gguf_stage(merged: Path, root: Path, quants: tuple[str, ...]) -> dict:
    """cpt-kit's gguf stage on the same merged model (levers off: the same work as by hand, plus the
    quantization quality gate, which by hand does not do; its seconds are in the returned metrics)."""
    from rich.console import Console

    from cpt_kit.export import gguf_stage
    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.recipe import Export, Model, Recipe
    from cpt_kit.rundir import RunDir

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "merged").symlink_to(merged.resolve())
    recipe = Recipe(name="m", model=Model(base=str(merged)),
                    export=Export(quantizations=quants, token_embedding_type=None, output_tensor_type=None, imatrix=False))
    run = RunDir(root)
    return gguf_stage.run(StageContext(recipe, run, Manifest.load(run.manifest), Console(quiet=True)))


def stage_vs_hand(work: Path, quants: tuple[str, ...], threads: int, repeats: int) -> dict:
    """By hand and the stage alternately `repeats` times each; the best wall and CPU time of each, and the
    wall seconds of the stage's quality gate in its fastest run."""
    runs = {"hand": [], "stage": []}
    for _ in range(repeats):
        runs["hand"].append(timed(by_hand, work / "merged", work / "by-hand", quants, threads))
        runs["stage"].append(timed(gguf_stage, work / "merged", work / "stage-run", quants))
    best = {k: (min(w for w, _, _ in v), min(c for _, c, _ in v)) for k, v in runs.items()}
    best["quality_seconds"] = min(runs["stage"], key=lambda r: r[0])[2]["quality_seconds"]
    return best


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_merge(base: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = run_worker([sys.executable, "-c", MERGE_CHILD, str(base), str(adapter), str(out)])
    if result is None:
        raise SystemExit("merge subprocess failed")
    return result


def tokens_per_second_llama(path: Path, prompt_ids: list[int], n: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, n_batch=128, verbose=False)
    count, start = 0, None
    for _ in llm.generate(prompt_ids, temp=0.0, top_k=1):
        if start is None:  # time the decode steps, not the prompt
            start = time.perf_counter()
        count += 1
        if count == n + 1:
            break
    seconds = time.perf_counter() - start
    llm.close()
    return n / seconds


def tokens_per_second_hf(model_dir: Path, prompt_ids: list[int], n: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)  # prompt + warm-up
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kwargs)
    total = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    prompt_only = time.perf_counter() - start
    return n / max(total - prompt_only, 1e-9)


def write_section(text: str) -> None:
    path = REPO / "BENCHMARKS.md"
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = current.find(f"\n{SECTION}\n")
    if start == -1:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        end = current.find("\n## ", start + 1)
        updated = current[: start + 1] + text + (current[end:] if end != -1 else "")
    path.write_text(updated, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench-export"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shard", default="50MB")
    parser.add_argument("--vocab", type=int, default=0, help="pad the vocabulary to this size (0: the tokenizer's 1000)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="by hand / gguf stage runs, alternating")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from cpt_kit.export.gguf import convert_to_gguf, quantize_gguf

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = build(work, args.hidden, args.layers, args.shard, args.vocab)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    adapter_bytes = dir_bytes(adapter)

    shutil.rmtree(work / "copy", ignore_errors=True)
    start = time.perf_counter()
    shutil.copytree(base, work / "copy")
    copy_seconds = time.perf_counter() - start
    shutil.rmtree(work / "copy")

    merge = measure_merge(base, adapter, work / "merged")
    gguf = work / "gguf"
    shutil.rmtree(gguf, ignore_errors=True)
    convert = convert_to_gguf(work / "merged", gguf / "m-F16.gguf", "f16")
    quants = {q: quantize_gguf(gguf / "m-F16.gguf", gguf / f"m-{q}.gguf", q, nthread=args.threads) for q in ("Q8_0", "Q4_K_M")}
    export_seconds = merge["seconds"] + convert["seconds"] + sum(q["seconds"] for q in quants.values())

    versus = stage_vs_hand(work, tuple(quants), args.threads, args.repeats)
    (hand_wall, hand_cpu), (stage_wall, stage_cpu), gate = versus["hand"], versus["stage"], versus["quality_seconds"]

    from transformers import AutoTokenizer
    prompt = AutoTokenizer.from_pretrained(work / "merged")("The old bridge over the river")["input_ids"]
    hf_tps = tokens_per_second_hf(work / "merged", prompt, args.tokens, args.threads)
    gguf_tps = {k: tokens_per_second_llama(gguf / f"m-{k}.gguf", prompt, args.tokens, args.threads)
                for k in ("F16", "Q8_0", "Q4_K_M")}

    merge_extra = merge["peak"] - merge["baseline"]
    params = merge["merged_bytes"] / 2 / 1e6
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    lines = [
        SECTION, "",
        "Merge memory, export time and inference speed on a random-weight Llama-architecture model built offline",
        f"(hidden {args.hidden}, {args.layers} layers, vocabulary {max(args.vocab, 1000)}, {params:.0f}M parameters, bf16, {len(shards)} shards of <= {args.shard};",
        "adapter: LoRA r16 rsLoRA on all linear layers + embed_tokens/lm_head as full modules).", "",
        f"- command: `python bench/export.py --hidden {args.hidden} --layers {args.layers} --shard {args.shard} --vocab {args.vocab}`",
        f"- machine: {cpu}, {os.cpu_count()} CPU threads (shared with other jobs), {args.threads} threads used",
        f"- date: {datetime.date.today().isoformat()}", "",
        "| measure | value | relative |", "|---|---|---|",
        f"| largest base shard | {largest / 2**20:.1f} MiB | 1.00x |",
        f"| adapter files | {adapter_bytes / 2**20:.1f} MiB | {adapter_bytes / largest:.2f}x shard |",
        f"| merge peak RSS above the imported libraries (VmHWM) | {merge_extra / 2**20:.1f} MiB | "
        f"**{merge_extra / largest:.2f}x shard** ({merge_extra / (largest + adapter_bytes):.2f}x of shard + adapter; target <= 2x) |",
        f"| merge peak RSS, whole process | {merge['peak'] / 2**20:.1f} MiB | libraries alone {merge['baseline'] / 2**20:.1f} MiB |",
        f"| copy base files ({dir_bytes(base) / 2**20:.0f} MiB, same disk) | {copy_seconds:.2f} s | 1.00x |",
        f"| merge | {merge['seconds']:.2f} s | {merge['seconds'] / copy_seconds:.1f}x copy |",
        f"| convert to F16 GGUF (llama.cpp converter) | {convert['seconds']:.2f} s | {convert['seconds'] / copy_seconds:.1f}x copy |",
        f"| quantize Q8_0 + Q4_K_M | {sum(q['seconds'] for q in quants.values()):.2f} s | "
        f"{sum(q['seconds'] for q in quants.values()) / copy_seconds:.1f}x copy |",
        f"| merge + convert + quantize | {export_seconds:.2f} s | **{export_seconds / copy_seconds:.1f}x copy** |",
        f"| converter + quantizer by hand (F16, Q8_0, Q4_K_M), best of {args.repeats} | {hand_wall:.2f} s wall, "
        f"{hand_cpu:.2f} s CPU | 1.00x |",
        f"| cpt-kit gguf stage, same work (levers off), best of {args.repeats} | {stage_wall:.2f} s wall, {stage_cpu:.2f} s CPU | "
        f"**{stage_wall / hand_wall:.2f}x by hand (wall), {stage_cpu / hand_cpu:.2f}x (CPU)** |",
        f"| of which the quantization quality gate (KL/perplexity vs F16, not done by hand) | {gate:.2f} s wall | "
        f"{gate / hand_wall:.2f}x by hand |",
        f"| gguf stage without the quality gate | {stage_wall - gate:.2f} s wall | "
        f"**{(stage_wall - gate) / hand_wall:.2f}x by hand** (target <= 1.3x) |",
        f"| HF generate (fp32), greedy decode | {hf_tps:.1f} tok/s | 1.00x |",
    ] + [f"| llama.cpp {k} GGUF, greedy decode | {v:.1f} tok/s | **{v / hf_tps:.2f}x HF** |" for k, v in gguf_tps.items()] + [
        "", f"Decode speed: {args.tokens} new tokens after a {len(prompt)}-token prompt, prompt time excluded.",
        "Merge memory is measured in a fresh subprocess (VmHWM reset after imports); the merge's logits",
        "check (loads base+adapter and the merged model) is a separate step of the merge stage and not included.",
        "The copy reads from the page cache (the base was just written), so it is a lower bound. On a shared",
        "2-core machine tokens/s vary between runs (up to 4x seen); compare ratios within one run only.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
