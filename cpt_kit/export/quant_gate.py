"""Per-quantization quality limits: which quantized GGUFs are good enough to ship.

A quantization passes when its perplexity increase over the unquantized GGUF and its mean KL
divergence from it (both measured by `quant_quality.compare_to_reference`) are within its limits.
The defaults below (table in the README) pass what llama.cpp's quantizers were measured to give real
small models (issue 11: Q8_0 +2.3..3.2%, Q4_K_M +10.8% on a 135M model), with the order of llama.cpp's
published KL tables, and fail the collapse seen on a 270M model's Q4_K_M (+225% perplexity).
bench/quant_levers.py could not refine them: offline-trained toy models are too flat to be hurt by any
quantization (mean KL <= 0.0003 even at Q4_K_M). A recipe overrides them per quantization with
`export.quant_max_ppl_delta` / `export.quant_max_kl` items such as "Q4_K_M=0.3" or "Q4_K_M=none".

The gguf stage gates every quantization right after making it and writes gguf/quality.json
(`quality_report`); the modelfile stage serves `served_quant` (never a failed quantization); verify
fails the run on any failed quantization, with the numbers and `fix_hint`.
"""

from __future__ import annotations

import math
import re
from typing import Optional

# quantization -> (max perplexity increase as a share, max mean KL divergence in nats/token)
DEFAULT_LIMITS: dict[str, tuple[float, float]] = {
    "Q8_0": (0.04, 0.02),  # a real 270M model's llama.cpp Q8_0 measured +2.3..3.2% (issue 11): it must pass
    "Q6_K": (0.06, 0.04),
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


def quality_report(export, reference: str, measured: dict | None, files: dict[str, dict]) -> dict:
    """The contents of gguf/quality.json: per quantization its size, fallback tensors, perplexity change and
    mean KL vs `reference` with its limits, `passed` and the reasons; the failed ones and what to do.

    `measured` is compare_to_reference's result (None when there is nothing quantized); `files` is the
    gguf stage's record per GGUF ("bytes", and for quantizations "fallback_tensors", "fallback_of")."""
    gates = gate(export, measured["quantized"]) if measured else {}
    for quant, result in gates.items():
        result.update(bytes=files[quant]["bytes"], fallback_tensors=files[quant].get("fallback_tensors"),
                      fallback_of=files[quant].get("fallback_of"))
    failed = [q for q, g in gates.items() if not g["passed"]]
    report = {"passed": not failed, "reference": {"name": reference, "bytes": files[reference]["bytes"],
                                                  **(measured["reference"] if measured else {})},
              "formats": gates, "failed": failed}
    if failed:
        report["fix"] = fix_hint(export, failed)
        report["message"] = "; ".join(f"{q} over its limit: " + ", ".join(gates[q]["reasons"]) for q in failed)
    return report


def served_quant(chosen: str, report: dict) -> str:
    """What the Modelfile serves: `chosen` when it passed (or is the unquantized reference), else the smallest
    quantization that passed, else the reference. Never a quantization that failed."""
    gates, reference = report["formats"], report["reference"]["name"]
    if chosen == reference or chosen not in gates or gates[chosen]["passed"]:
        return chosen  # (one the gguf stage did not make: the modelfile stage says so)
    return best_passing(gates, reference, {q: g["bytes"] for q, g in gates.items()})
