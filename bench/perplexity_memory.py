"""Peak memory of perplexity scoring (evaluate + verify) on a 262k-vocabulary model shape, before/after.

Before: the scoring code as it was (full [batch, seq, vocab] fp32 logits on the HF side, a float64
copy of every position's logits on the GGUF side), kept below verbatim as the baseline. After:
`cpt_kit.perplexity` (output head applied chunk by chunk; llama.cpp logits read in batches of
`chunk_tokens` rows, float32). Each phase runs in its own process; its peak RSS (VmHWM) and the
RSS after loading the model are reported, and the perplexities must agree.

The model is random, with the shape that matters for this: a 262,144-token vocabulary and hidden
size 640 (Gemma-3-270M-like, tied embeddings), 2 layers (the logits, not the depth, dominate
scoring memory). The GGUF tokenizer is the tiny offline one padded to the vocabulary by
llama.cpp's converter; the blocks are random ids.

    python bench/perplexity_memory.py                       # CPU: 2 blocks x 2048, old batch 1
    python bench/perplexity_memory.py --device cuda --blocks 4 --old-batch 4   # GPU memory of the HF side
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(hidden_size=640, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             intermediate_size=2048, vocab_size=262144, tie_word_embeddings=True)


def old_hf_perplexity(model, blocks, batch_size=4):
    """evaluate.perplexity before this change (the same computation, for blocks of one length)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[first:first + batch_size], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[:, :-1, :].float()
            targets = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
            del logits
    return math.exp(total_nll / total_tokens)


def old_gguf_perplexity(gguf, blocks, n_threads=None):
    """verify.gguf_perplexity before this change (verbatim)."""
    import numpy as np
    from llama_cpp import Llama

    length = max(len(b) for b in blocks)
    llm = Llama(model_path=str(gguf), n_ctx=length, n_batch=length, n_ubatch=length, logits_all=True,
                n_threads=n_threads, verbose=False)
    total, count = 0.0, 0
    for block in blocks:
        llm.reset()
        llm.eval(list(block))
        logits = np.asarray(llm.scores[: len(block) - 1], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        targets = np.asarray(block[1:])
        total += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    del llm
    return math.exp(total / count)


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(out: Path) -> tuple[Path, Path]:
    model_dir, gguf = out / "model", out / "model-F16.gguf"
    if not (model_dir / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from cpt_kit.tiny_model import build_tiny_model

        texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "examples/data/general").glob("*.txt"))]
        build_tiny_model(model_dir, texts[:20])
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, max_position_embeddings=4096))
        for old in model_dir.glob("model*.safetensors*"):
            old.unlink()
        model.to(torch.bfloat16).save_pretrained(model_dir)
    if not gguf.is_file():
        from cpt_kit.export.gguf import convert_to_gguf
        convert_to_gguf(model_dir, gguf, "f16")
    return model_dir, gguf


def run_phase(args) -> dict:
    import numpy as np
    import torch

    model_dir, gguf = args.out / "model", args.out / "model-F16.gguf"
    blocks = np.random.default_rng(0).integers(3, SHAPE["vocab_size"], size=(args.blocks, args.seq)).tolist()
    threads = torch.get_num_threads()
    cuda = args.device == "cuda"
    if args.phase.startswith("hf"):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    loaded = rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        gpu_loaded = torch.cuda.memory_allocated() / 2**20
    started = time.perf_counter()
    if args.phase == "hf_old":
        ppl = old_hf_perplexity(model, blocks, args.old_batch)
    elif args.phase == "hf_new":
        from cpt_kit.perplexity import hf_scores
        ppl = hf_scores(model, blocks).perplexity
    elif args.phase == "gguf_old":
        ppl = old_gguf_perplexity(gguf, blocks, threads)
    else:
        from cpt_kit.perplexity import gguf_scores
        ppl = gguf_scores(gguf, blocks, threads).perplexity
    result = {"phase": args.phase, "perplexity": ppl, "seconds": round(time.perf_counter() - started, 1),
              "rss_after_load_mib": round(loaded), "peak_rss_mib": round(rss_mib("VmHWM"))}
    result["scoring_rss_mib"] = result["peak_rss_mib"] - result["rss_after_load_mib"]
    if cuda and args.phase.startswith("hf"):
        result["gpu_scoring_mib"] = round(torch.cuda.max_memory_allocated() / 2**20 - gpu_loaded)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cpt-kit-bench-ppl"))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--old-batch", type=int, default=1, help="batch size of the old HF code (its default was 4)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--phases", default="hf_old,hf_new,gguf_old,gguf_new")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.out)
    results = []
    for phase in args.phases.split(","):
        cmd = [sys.executable, __file__, "--phase", phase, "--out", str(args.out), "--blocks", str(args.blocks),
               "--seq", str(args.seq), "--old-batch", str(args.old_batch), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"phase": phase, "error": proc.stderr.strip().splitlines()[-1:] or proc.returncode})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by = {r["phase"]: r for r in results}
    for side in ("hf", "gguf"):
        old, new = by.get(f"{side}_old", {}), by.get(f"{side}_new", {})
        if "peak_rss_mib" in old and "peak_rss_mib" in new:
            print(f"{side}: peak RSS {old['peak_rss_mib']} -> {new['peak_rss_mib']} MiB "
                  f"({new['peak_rss_mib'] / old['peak_rss_mib']:.2f}x); scoring on top of the loaded model "
                  f"{old['scoring_rss_mib']} -> {new['scoring_rss_mib']} MiB; perplexity {old['perplexity']:.6g} vs "
                  f"{new['perplexity']:.6g}; {old['seconds']} s vs {new['seconds']} s")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=2))


if __name__ == "__main__":
    main()
