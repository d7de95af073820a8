"""The gguf stage: `merged/` -> `gguf/<name>-F16.gguf` (or BF16) + one file per quantization.

Quality levers from the recipe's Export section: token_embd/output tensor types for every
quantization, and (export.imatrix) an importance matrix computed from the run's training text,
`gguf/imatrix.gguf`, used for every quantization below 8 bits.

Every quantization is then measured against the unquantized GGUF (perplexity change, mean KL divergence)
on the blocks verify uses, gated by its limits, and the result written to `gguf/quality.json`, which the
modelfile stage (which file to serve) and verify (pass/fail) read."""

from __future__ import annotations

import time
from pathlib import Path

from cpt_kit.errors import ExportError
from cpt_kit.run_files import gguf_files, quality_path
from cpt_kit.rundir import RunDir


def measure_quality(ctx, files: dict[str, Path], produced: dict[str, dict]) -> dict:
    """Gate every quantization in `files` against the unquantized GGUF on the comparison blocks and
    write gguf/quality.json; `produced` is this stage's record per file (bytes, fallback tensors)."""
    from cpt_kit.hardware import cpu_threads
    from transformers import AutoTokenizer

    from cpt_kit.export.comparison_blocks import comparison_blocks
    from cpt_kit.export.quant_gate import quality_report
    from cpt_kit.export.quant_quality import compare_to_reference
    from cpt_kit.progress import progress
    from cpt_kit.run_files import tokenizer_dir
    from cpt_kit.rundir import atomic_write_json

    recipe, run_dir = ctx.recipe, ctx.run
    reference = recipe.export.outtype.upper()
    quantized = {q: p for q, p in files.items() if q != reference}
    measured, blocks, source = None, [], None
    if quantized:
        blocks, source = comparison_blocks(run_dir, recipe, AutoTokenizer.from_pretrained(tokenizer_dir(run_dir)))
        with progress(ctx.console, f"quantization quality vs {reference}", None, heartbeat=True):
            measured = compare_to_reference(files[reference], quantized, blocks, cpu_threads())
    report = quality_report(recipe.export, reference, measured, produced)
    report.update(blocks=len(blocks), block_source=source)
    for quant, result in report["formats"].items():
        status = "ok" if result["passed"] else "FAILED: " + "; ".join(result["reasons"])
        ctx.log(f"{quant}: {result['bytes'] / 2**20:.1f} MiB, perplexity {result['ppl_delta']:+.2%} vs {reference}, "
                f"mean KL {result['mean_kl']:.4f}, same top token {result['same_top_token']:.1%} ({status})")
    if report["failed"]:
        ctx.log(f"fix: {report['fix']}")
    atomic_write_json(quality_path(run_dir), report)
    return report


def input_fingerprint(ctx) -> dict:
    from cpt_kit.export.llama_cpp import installed_version
    try:
        return {"llama-cpp-python": installed_version()}
    except ExportError:
        return {"llama-cpp-python": None}


NO_IMATRIX = ("Q8_0", "F16", "BF16")
"""Types llama.cpp quantizes without using an importance matrix."""


def imatrix_path(run: RunDir) -> Path:
    return run.gguf / "imatrix.gguf"


def _imatrix(ctx, reference: Path, quants: list[str]) -> dict | None:
    """Compute gguf/imatrix.gguf from the training blocks when the recipe asks and a quantization uses it."""
    recipe, run_dir = ctx.recipe, ctx.run
    if not recipe.export.imatrix or all(q in NO_IMATRIX for q in quants):
        return None
    if not (run_dir.data / "train").is_dir():
        ctx.log("no training text in this run (data/train): quantizing without an importance matrix")
        return None
    import tempfile

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from cpt_kit.export.imatrix import CHUNK_TOKENS, compute_imatrix, write_training_text
    from cpt_kit.run_files import tokenizer_dir

    blocks = load_from_disk(str(run_dir.data / "train"))["input_ids"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(run_dir))
    chunk = min(CHUNK_TOKENS, recipe.model.max_seq_length)
    with tempfile.TemporaryDirectory(prefix="cpt-kit-imatrix-") as tmp:
        text = Path(tmp) / "train.txt"
        tokens = write_training_text(tokenizer, blocks, text, recipe.export.imatrix_tokens)
        if tokens < 4 * chunk:  # llama-imatrix needs at least two chunks of text after its own tokenization
            ctx.log(f"only {tokens} training tokens: quantizing without an importance matrix (needs {4 * chunk})")
            return None
        ctx.log(f"importance matrix from {tokens:,} training tokens")
        info = compute_imatrix(reference, text, imatrix_path(run_dir), min(tokens, recipe.export.imatrix_tokens),
                               chunk=chunk, log=ctx.log)
    info["file"] = str(imatrix_path(run_dir).relative_to(run_dir.root))
    return info


def run(ctx) -> dict:
    from cpt_kit.export.gguf import check_disk_space, convert_to_gguf, quantize_gguf
    from cpt_kit.progress import progress

    recipe, run_dir = ctx.recipe, ctx.run
    export = recipe.export
    merged = run_dir.merged
    if not (merged / "config.json").is_file():
        raise ExportError(f"no merged model in {merged}", where=str(run_dir.root), hint="run the merge stage first")
    files = gguf_files(run_dir, recipe)
    outtype = export.outtype.upper()
    quants = [q for q in files if q != outtype]
    metrics: dict = {"disk": check_disk_space(merged, run_dir.gguf, len(quants))}
    ctx.log(f"converting {merged} to {outtype} GGUF")
    with progress(ctx.console, f"convert to {outtype}", None, heartbeat=True):
        base = convert_to_gguf(merged, files[outtype], export.outtype, log=ctx.log)
    files_metrics = {outtype: _short(base, run_dir)}
    imatrix = _imatrix(ctx, files[outtype], quants)
    if imatrix:
        metrics["imatrix"] = imatrix
    for quant in quants:
        use_imatrix = imatrix is not None and quant not in NO_IMATRIX
        ctx.log(f"quantizing to {quant}" + (" with the importance matrix" if use_imatrix else ""))
        with progress(ctx.console, f"quantize to {quant}", None, heartbeat=True):
            info = quantize_gguf(files[outtype], files[quant], quant, token_embedding_type=export.token_embedding_type,
                                 output_tensor_type=export.output_tensor_type,
                                 imatrix=imatrix_path(run_dir) if use_imatrix else None)
        if info["fallback_tensors"]:
            ctx.log(f"{quant}: {info['fallback_tensors']} of {info['fallback_of']} tensor(s) required fallback "
                    "quantization (row sizes not a multiple of the block size)")
        files_metrics[quant] = _short(info, run_dir)
    metrics["files"] = files_metrics
    metrics["convert_seconds"] = base["seconds"]
    for quant in quants:
        metrics[f"{quant}_mib"] = round(files_metrics[quant]["bytes"] / 2**20, 2)
        metrics[f"{quant}_fallback"] = f"{files_metrics[quant]['fallback_tensors']} of {files_metrics[quant]['fallback_of']}"
    metrics[f"{outtype}_mib"] = round(base["bytes"] / 2**20, 2)
    started = time.perf_counter()
    quality = measure_quality(ctx, files, files_metrics)
    metrics["quality_seconds"] = round(time.perf_counter() - started, 2)
    metrics["quant_failed"] = quality["failed"]
    for quant, result in quality["formats"].items():
        metrics[f"{quant}_ppl_delta"] = round(result["ppl_delta"], 5)
        metrics[f"{quant}_kl"] = round(result["mean_kl"], 5)
    metrics["headline"] = [f"{outtype}_mib"] + [f"{q}_mib" for q in quants] + ["quant_failed"]
    return metrics


def _short(info: dict, run_dir: RunDir) -> dict:
    keep = {k: v for k, v in info.items() if k != "path"}
    keep["file"] = str(Path(info["path"]).relative_to(run_dir.root))
    return keep
