"""Per-quantization quality limits: which quantized GGUFs are good enough to ship.

A quantization passes when its perplexity increase over the unquantized GGUF and its mean KL
divergence from it (both measured by `quant_quality.compare_to_reference`) are within its limits.
The defaults below come from bench/quant_levers.py (docs in the README): they pass what llama.cpp's
quantizers give a small model when the quality levers are on (token_embd/output at Q8_0, an
importance matrix) with room for a still-undertrained model, and fail the collapse seen without them
(a 270M model's Q4_K_M at +225% perplexity). A recipe overrides them per quantization with
`export.quant_max_ppl_delta` / `export.quant_max_kl` items such as "Q4_K_M=0.3" or "Q4_K_M=none".
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

# quantization -> (max perplexity increase as a share, max mean KL divergence in nats/token)
DEFAULT_LIMITS: dict[str, tuple[float, float]] = {
    "Q8_0": (0.02, 0.01),
    "Q6_K": (0.05, 0.03),
    "Q5_K_M": (0.08, 0.06), "Q5_K_S": (0.10, 0.08), "Q5_1": (0.10, 0.08), "Q5_0": (0.10, 0.08),
    "Q4_K_M": (0.15, 0.12), "Q4_K_S": (0.20, 0.15), "Q4_1": (0.25, 0.20), "Q4_0": (0.25, 0.20),
    "Q3_K_L": (0.35, 0.30), "Q3_K_M": (0.40, 0.35), "Q3_K_S": (0.50, 0.45),
    "Q2_K": (1.00, 0.80),
}
_ITEM = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=\s*(\S+)\s*$")


def parse_limit_items(items: tuple[str, ...], key: str) -> dict[str, Optional[float]]:
    """{"Q4_K_M": 0.3, "Q8_0": None} from ("Q4_K_M=0.3", "Q8_0=none"); ValueError naming the bad item."""
    out: dict[str, Optional[float]] = {}
    for item in items:
        match = _ITEM.match(item)
        if not match:
            raise ValueError(f"{key}: {item!r} is not QUANT=VALUE (e.g. 'Q4_K_M=0.3' or 'Q4_K_M=none')")
        quant, raw = match.group(1).upper(), match.group(2).lower()
        if raw in ("none", "off"):
            out[quant] = None
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{key}: {item!r}: {raw!r} is not a number or 'none'") from None
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{key}: {item!r}: the limit must be a positive number")
        out[quant] = value
    return out


def limits_for(export, quant: str) -> tuple[Optional[float], Optional[float]]:
    """(max perplexity increase, max mean KL) for `quant` under the recipe's Export section."""
    ppl, kl = DEFAULT_LIMITS.get(quant.upper(), (None, None))
    ppl = parse_limit_items(export.quant_max_ppl_delta, "export.quant_max_ppl_delta").get(quant.upper(), ppl)
    kl = parse_limit_items(export.quant_max_kl, "export.quant_max_kl").get(quant.upper(), kl)
    return ppl, kl


def gate(export, quality: dict[str, dict]) -> dict[str, dict]:
    """Per quantization: the measured numbers, its limits, `passed` and the reasons it failed."""
    out = {}
    for quant, numbers in quality.items():
        max_ppl, max_kl = limits_for(export, quant)
        reasons = []
        delta, kl = numbers["ppl_delta"], numbers["mean_kl"]
        if not (math.isfinite(delta) and math.isfinite(kl)):
            reasons.append(f"perplexity {numbers['perplexity']} / mean KL {kl} is not finite")
        if max_ppl is not None and delta > max_ppl:
            reasons.append(f"perplexity {delta:+.2%} vs the unquantized GGUF (limit +{max_ppl:.0%})")
        if max_kl is not None and kl > max_kl:
            reasons.append(f"mean KL divergence {kl:.4f} (limit {max_kl:g})")
        out[quant] = {**numbers, "max_ppl_delta": max_ppl, "max_kl": max_kl, "passed": not reasons,
                      "reasons": reasons}
    return out


def fix_hint(export, failed: list[str]) -> str:
    """What to do about failed quantizations, given which quality levers the recipe already uses."""
    steps = []
    if export.token_embedding_type is None or export.output_tensor_type is None:
        steps.append('keep token_embd/output at higher precision (export.token_embedding_type="Q8_0", '
                     'export.output_tensor_type="Q8_0")')
    if not export.imatrix:
        steps.append("quantize with an importance matrix from the training text (export.imatrix=True)")
    steps.append("use a larger quantization (e.g. Q5_K_M, Q6_K or Q8_0) in export.quantizations")
    steps.append("or accept the loss: raise the limit, e.g. " + ", ".join(
        f'export.quant_max_kl=("{q}=...",)' for q in failed[:1]))
    return "; ".join(steps)


def best_passing(gates: dict[str, dict], reference: str, sizes: dict[str, int]) -> str:
    """The smallest quantization that passed; the unquantized reference when none did."""
    passing = [q for q, g in gates.items() if g["passed"]]
    return min(passing, key=lambda q: sizes[q]) if passing else reference


def repoint_modelfile(modelfile: Path, gguf: Path) -> str:
    """Rewrite `modelfile`'s FROM to `gguf` (relative path), keeping every other command; returns the new FROM."""
    from cpt_kit.export.modelfile import parse, render
    from cpt_kit.rundir import atomic_write_text

    parsed = parse(modelfile.read_text(encoding="utf-8"))
    parsed.from_ = Path(os.path.relpath(gguf, modelfile.parent)).as_posix()
    atomic_write_text(modelfile, render(parsed))
    return parsed.from_


def check_quantizations(ctx, files: dict[str, Path], reference: str, quality: dict[str, dict]) -> dict:
    """The verify check over every quantization: gate each one, report size / perplexity change / KL /
    fallback count, and when the Modelfile's quantization failed, point the Modelfile at the smallest
    one that passed (the unquantized GGUF if none did) so it never serves a failed quantization."""
    from cpt_kit.export.modelfile_stage import ollama_name
    from cpt_kit.run_files import chosen_quant
    from cpt_kit.export.ollama import publish

    recipe, run = ctx.recipe, ctx.run
    sizes = {name: path.stat().st_size for name, path in files.items()}
    produced = ctx.manifest.metrics("gguf").get("files", {})
    gates = gate(recipe.export, quality)
    for quant, result in gates.items():
        result["bytes"] = sizes[quant]
        result["fallback_tensors"] = produced.get(quant, {}).get("fallback_tensors")
        result["fallback_of"] = produced.get(quant, {}).get("fallback_of")
        status = "ok" if result["passed"] else "FAILED: " + "; ".join(result["reasons"])
        ctx.log(f"{quant}: {sizes[quant] / 2**20:.1f} MiB, perplexity {result['ppl_delta']:+.2%} vs {reference}, "
                f"mean KL {result['mean_kl']:.4f}, same top token {result['same_top_token']:.1%} ({status})")
    failed = [q for q, g in gates.items() if not g["passed"]]
    chosen = chosen_quant(recipe)
    check = {"passed": not failed, "reference": reference, "formats": gates, "failed": failed, "modelfile_quant": chosen}
    if not failed:
        return check
    check["fix"] = fix_hint(recipe.export, failed)
    check["message"] = "; ".join(f"{q} over its limit: " + ", ".join(gates[q]["reasons"]) for q in failed)
    modelfile = run.ollama / "Modelfile"
    if chosen in failed:
        fallback = best_passing(gates, reference, sizes)
        check["modelfile_quant"] = fallback
        if modelfile.is_file():
            new_from = repoint_modelfile(modelfile, files[fallback])
            check["message"] += f"; ollama/Modelfile now uses {fallback} ({new_from}) instead of {chosen}"
            ctx.log(f"ollama/Modelfile: FROM {new_from} ({chosen} failed its quality limits)")
            if ctx.manifest.metrics("modelfile").get("ollama") == "created":
                prompt = recipe.eval.prompts[0] if recipe.eval.prompts else "Hello"
                publish(modelfile, ollama_name(recipe.name), prompt, ctx.log)
    return check
